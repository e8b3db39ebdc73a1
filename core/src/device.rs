//! Device selection shared by every binary: `cpu`, `auto` or `cuda:N`.

use candle_core::Device;

use crate::{Error, Result};

/// Parses a device flag: `cpu`; `cuda:N` (needs a build with the `cuda` feature and that GPU);
/// `auto` = the first GPU when the build has CUDA and one is present, else the CPU (logged).
pub fn parse_device(s: &str) -> Result<Device> {
    match s.trim() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            #[cfg(feature = "cuda")]
            if let Ok(d) = Device::new_cuda(0) {
                tracing::info!("device auto: using cuda:0");
                return Ok(d);
            }
            tracing::info!("device auto: using the CPU");
            Ok(Device::Cpu)
        }
        other => {
            let Some(n) =
                other
                    .strip_prefix("cuda:")
                    .or(if other == "cuda" { Some("0") } else { None })
            else {
                return Err(Error::Config(format!(
                    "unknown device `{other}` (expected cpu, auto or cuda:N)"
                )));
            };
            let n: usize = n.parse().map_err(|_| {
                Error::Config(format!("device `{other}`: `{n}` is not a GPU index"))
            })?;
            cuda_device(other, n)
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(name: &str, n: usize) -> Result<Device> {
    Device::new_cuda(n).map_err(|e| {
        Error::Config(format!(
            "device `{name}` is not available (no such NVIDIA GPU, or no driver): {}",
            without_backtrace(e)
        ))
    })
}

/// candle attaches a backtrace to its errors when RUST_BACKTRACE is set; a device that is
/// missing is a user-facing error, so only the message is kept.
#[cfg(feature = "cuda")]
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        e => e,
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(name: &str, _n: usize) -> Result<Device> {
    Err(Error::Config(format!(
        "device `{name}` requested but this binary was built without the `cuda` feature"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_auto_and_rejects_the_rest() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("auto").is_ok());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("unknown device `tpu`"), "{e}");
        let e = parse_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("not a GPU index"), "{e}");
        #[cfg(not(feature = "cuda"))]
        {
            let e = parse_device("cuda:0").unwrap_err().to_string();
            assert!(
                e.contains(
                    "device `cuda:0` requested but this binary was built without the `cuda` feature"
                ),
                "{e}"
            );
        }
    }
}
