//! Property tests of the run-config parser ([`RunConfig::from_toml`], what `coordinator --config`
//! reads from disk): arbitrary TOML text, a valid config with its characters corrupted, and valid
//! configs whose values are set to extremes (0, −1, i64::MIN/MAX, 2^64, huge and tiny floats,
//! NaN, ±inf, −0, wrong types, long strings, odd architectures and encodings). The parser must
//! return `Ok` or `Err`, never panic; an accepted config passes its own validation again and its
//! durations convert.
//!
//! Every property runs `PROPTEST_CASES` cases (proptest's variable) when it is set, else a
//! default sized so that this file runs in seconds in a debug build.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::BTreeMap;

use coordinator::config::RunConfig;
use proptest::prelude::*;

use distill_testkit::fuzz::cases as config;

const GOOD: &str = r#"
data = "synthetic:1"
epochs = 3
temperature = 4.0
[student]
arch = "mlp:784-32-10"
[optim]
kind = "adamw"
lr = 0.001
[[members]]
name = "big"
endpoints = ["http://127.0.0.1:5000", "http://127.0.0.1:5001"]
[[members]]
name = "wide"
endpoints = ["http://127.0.0.1:5002"]
weight = 2.0
"#;

/// What an accepted config satisfies: validation passes again, the student settings build, and
/// every duration converts (`Duration::from_secs_f64` panics on NaN, negative or huge values).
fn check_ok(cfg: &RunConfig) {
    cfg.validate().unwrap();
    cfg.student_settings().unwrap().validate().unwrap();
    let _ = cfg.membership.to_config(cfg.seed);
    for s in [
        cfg.lease_timeout_secs,
        cfg.teacher_timeout_secs,
        cfg.eval_timeout_secs,
        cfg.hello_timeout_secs,
        cfg.stall_timeout_secs,
        cfg.sync.round_timeout_secs,
        cfg.sync.state_every_secs,
    ] {
        let _ = std::time::Duration::from_secs_f64(s);
    }
    let _ = cfg.max_message_bytes();
    // Serialising and parsing again gives the same config.
    let text = toml::to_string(cfg).unwrap();
    assert_eq!(&RunConfig::from_toml(&text).unwrap(), cfg, "{text}");
}

fn parse(text: &str) {
    match RunConfig::from_toml(text) {
        Ok(cfg) => check_ok(&cfg),
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// Every key a config may hold, by section ("" is the top level), with its base value.
fn keys() -> Vec<(&'static str, &'static str)> {
    vec![
        ("", "data"),
        ("", "run_dir"),
        ("", "epochs"),
        ("", "batch_size"),
        ("", "seed"),
        ("", "temperature"),
        ("", "alpha"),
        ("", "combine"),
        ("", "soft_targets"),
        ("", "checkpoint_every"),
        ("", "lease_timeout_secs"),
        ("", "prefetch"),
        ("", "teacher_policy"),
        ("", "teacher_timeout_secs"),
        ("", "max_message_mb"),
        ("", "min_workers"),
        ("", "eval_timeout_secs"),
        ("", "hello_timeout_secs"),
        ("", "stall_timeout_secs"),
        ("student", "arch"),
        ("student", "dropout"),
        ("student", "input_dropout"),
        ("student", "precision"),
        ("optim", "kind"),
        ("optim", "lr"),
        ("optim", "momentum"),
        ("optim", "nesterov"),
        ("optim", "weight_decay"),
        ("optim", "betas"),
        ("optim", "eps"),
        ("optim", "schedule"),
        ("optim", "warmup_epochs"),
        ("optim", "clip_grad_norm"),
        ("optim", "max_norm"),
        ("sync", "every"),
        ("sync", "dtype"),
        ("sync", "chunk_bytes"),
        ("sync", "round_timeout_secs"),
        ("sync", "state_every_secs"),
        ("sync", "outer_lr"),
        ("sync", "outer_momentum"),
        ("sync", "schedule"),
        ("membership", "lease_ttl_secs"),
        ("membership", "heartbeat_secs"),
        ("membership", "failure_threshold"),
        ("membership", "probe_initial_secs"),
        ("membership", "probe_max_secs"),
        ("membership", "hedge"),
        ("cache", "dir"),
        ("cache", "mode"),
        ("members", "name"),
        ("members", "endpoints"),
        ("members", "weight"),
        ("", "no_such_key"),
    ]
}

/// A conv architecture of `n` conv layers of 1 channel (64 or more: see
/// [`known_panic_conv_arch_with_64_layers`]).
fn conv_arch(n: usize) -> String {
    format!("\"conv:{}8-10\"", "1-".repeat(n))
}

/// Extreme TOML values of every type.
fn extreme_value() -> impl Strategy<Value = String> {
    let ints = prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("1".to_string()),
        Just(i64::MAX.to_string()),
        Just(i64::MIN.to_string()),
        Just(u64::MAX.to_string()),
        Just(u32::MAX.to_string()),
        Just((1u64 << 53).to_string()),
        any::<i64>().prop_map(|v| v.to_string()),
    ];
    let floats = prop_oneof![
        Just("0.0".to_string()),
        Just("-0.0".to_string()),
        Just("1e308".to_string()),
        Just("-1e308".to_string()),
        Just("1.7976931348623157e308".to_string()),
        Just("5e-324".to_string()),
        Just("1e-320".to_string()),
        Just("nan".to_string()),
        Just("-nan".to_string()),
        Just("inf".to_string()),
        Just("-inf".to_string()),
        Just("1e9".to_string()),
        Just("1000000000.0000001".to_string()),
        Just("3.4028235e38".to_string()),
        Just("3.5e38".to_string()),
        Just("1e-46".to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
    ];
    let strings = prop_oneof![
        Just("\"\"".to_string()),
        Just("\"topk:0\"".to_string()),
        Just("\"topk:18446744073709551615\"".to_string()),
        Just("\"topk:1\"".to_string()),
        Just("\"topk:-1\"".to_string()),
        Just("\"f16\"".to_string()),
        Just("\"mlp:784-18446744073709551615-10\"".to_string()),
        Just("\"mlp:0-10\"".to_string()),
        Just("\"mlp:10\"".to_string()),
        Just("\"conv:4294967296-8-10\"".to_string()),
        (0..64usize).prop_map(conv_arch),
        Just("\"synthetic:18446744073709551616\"".to_string()),
        Just("\"mnist:\"".to_string()),
        Just("\"safetensors:/nonexistent\"".to_string()),
        Just("\"http://127.0.0.1:0\"".to_string()),
        Just("\"http://[::1]:99999\"".to_string()),
        Just("\"step:0:0.5\"".to_string()),
        Just("\"cosine:nan\"".to_string()),
        Just(format!("\"{}\"", "x".repeat(10_000))),
        "\"[ -~]{0,24}\"",
    ];
    prop_oneof![
        3 => ints,
        3 => floats,
        2 => strings,
        1 => Just("true".to_string()),
        1 => Just("[]".to_string()),
        1 => Just("[nan, inf]".to_string()),
        1 => Just("[0.9, 0.999]".to_string()),
        1 => Just("[1.0, -0.0]".to_string()),
        1 => Just("{}".to_string()),
        1 => Just("{ kind = \"step\", every_epochs = 0.0, gamma = nan }".to_string()),
        1 => Just("{ kind = \"cosine\", final_frac = inf }".to_string()),
        1 => Just("[\"http://127.0.0.1:1\", \"\"]".to_string()),
        1 => Just("1979-05-27T07:32:00Z".to_string()),
    ]
}

/// Renders the base config with `overrides` (section, key, literal) applied, members last.
fn render(overrides: &[((&str, &str), String)], with_cache: bool) -> String {
    let mut sections: BTreeMap<&str, Vec<(String, String)>> = BTreeMap::new();
    let base: &[(&str, &str, &str)] = &[
        ("", "data", "\"synthetic:1\""),
        ("", "epochs", "3"),
        ("", "temperature", "4.0"),
        ("student", "arch", "\"mlp:784-32-10\""),
        ("optim", "kind", "\"adamw\""),
        ("optim", "lr", "0.001"),
        ("sync", "every", "1"),
        ("membership", "hedge", "true"),
    ];
    for (s, k, v) in base {
        sections
            .entry(s)
            .or_default()
            .push((k.to_string(), v.to_string()));
    }
    if with_cache {
        sections
            .entry("cache")
            .or_default()
            .push(("dir".into(), "\"/tmp/distill-fuzz-cache\"".into()));
    }
    let mut members = vec![
        vec![
            ("name".to_string(), "\"big\"".to_string()),
            (
                "endpoints".to_string(),
                "[\"http://127.0.0.1:5000\"]".to_string(),
            ),
        ],
        vec![("name".to_string(), "\"wide\"".to_string())],
    ];
    for ((s, k), v) in overrides {
        let entries = if *s == "members" {
            &mut members[0]
        } else {
            sections.entry(s).or_default()
        };
        entries.retain(|(key, _)| key != k);
        entries.push((k.to_string(), v.clone()));
    }
    let mut out = String::new();
    for (k, v) in sections.get("").into_iter().flatten() {
        out.push_str(&format!("{k} = {v}\n"));
    }
    for (s, entries) in &sections {
        if s.is_empty() {
            continue;
        }
        out.push_str(&format!("[{s}]\n"));
        for (k, v) in entries {
            out.push_str(&format!("{k} = {v}\n"));
        }
    }
    for m in &members {
        out.push_str("[[members]]\n");
        for (k, v) in m {
            out.push_str(&format!("{k} = {v}\n"));
        }
    }
    out
}

fn overrides() -> impl Strategy<Value = Vec<((&'static str, &'static str), String)>> {
    proptest::collection::vec((proptest::sample::select(keys()), extreme_value()), 1..4)
}

proptest! {
    #![proptest_config(config(256))]

    /// A valid config with one to three keys set to extreme values.
    #[test]
    fn extreme_values(ov in overrides(), with_cache in any::<bool>()) {
        parse(&render(&ov, with_cache));
    }

    /// The valid config with characters replaced, inserted or removed.
    #[test]
    fn corrupted_text(edits in proptest::collection::vec((any::<usize>(), 0..3u8, proptest::char::any()), 1..5)) {
        let mut chars: Vec<char> = GOOD.chars().collect();
        for (i, op, c) in edits {
            let at = i % (chars.len() + 1);
            match op {
                0 if at < chars.len() => chars[at] = c,
                1 => chars.insert(at, c),
                _ if at < chars.len() => {
                    chars.remove(at);
                }
                _ => {}
            }
        }
        parse(&chars.into_iter().collect::<String>());
    }

    /// Arbitrary text, and arbitrary lines of `key = value` shape.
    #[test]
    fn arbitrary_toml(
        text in ".{0,200}",
        lines in proptest::collection::vec(("[a-z_.\\[\\]]{0,12}", "[ -~]{0,16}"), 0..8),
    ) {
        parse(&text);
        let doc: String = lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        parse(&doc);
        parse(&format!("{GOOD}\n{doc}"));
    }
}

#[test]
fn base_config_is_valid() {
    let cfg = RunConfig::from_toml(&render(&[], false)).unwrap();
    check_ok(&cfg);
    check_ok(&RunConfig::from_toml(GOOD).unwrap());
}

/// Deeply nested arrays and tables: the TOML parser must refuse or accept them without
/// overflowing the stack.
#[test]
fn deep_nesting() {
    for depth in [10, 100, 1000, 10_000] {
        parse(&format!(
            "data = {}1{}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        ));
        parse(&format!(
            "data = {}1{}\n",
            "{a=".repeat(depth),
            "}".repeat(depth)
        ));
        parse(&format!("{}\n", "[a]\n".repeat(depth)));
    }
}

/// A conv architecture of 64 (or more) conv layers in `student.arch` used to panic in
/// `distill_core::spec::Arch::validate` (`1usize << channels.len()`); it is an error now.
#[test]
fn known_panic_conv_arch_with_64_layers() {
    let text = render(&[(("student", "arch"), conv_arch(64))], false);
    assert!(RunConfig::from_toml(&text).is_err());
}
