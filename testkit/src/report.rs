//! Readers of a run's `report.json`.

use std::path::Path;

/// The unsigned integer `k` of a report (or any JSON object); panics naming it and the object.
pub fn count(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k}: {v}"))
}

/// Reads `run_dir/report.json`.
pub fn read_report(run_dir: &Path) -> serde_json::Value {
    let p = run_dir.join("report.json");
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The entry of member `name` in a report's `members`.
pub fn member<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members in {report}"))
        .iter()
        .find(|m| m["member"] == name)
        .unwrap_or_else(|| panic!("member {name} not in {report}"))
}

/// The `RunStatus` of the coordinator at `addr` (None while it does not answer). Bounded: a
/// coordinator that accepts but never answers reads as not answering, so the caller's deadline
/// fails the test instead of hanging it.
pub fn run_status(addr: &str) -> Option<distill_proto::pb::RunStatusResponse> {
    use distill_proto::pb::coordinator_client::CoordinatorClient;
    use std::time::Duration;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10));
        let mut c = CoordinatorClient::new(ep.connect().await.ok()?);
        c.run_status(distill_proto::pb::RunStatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    })
}
