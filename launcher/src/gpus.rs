//! `--nproc-per-node auto|gpu|cpu`: how many ranks this node should run.
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where a GPU count came from (said once in the launcher's log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuCount {
    pub count: usize,
    pub source: String,
}

/// Visible NVIDIA GPUs: `CUDA_VISIBLE_DEVICES` when set, else `nvidia-smi -L`, else
/// `/proc/driver/nvidia/gpus`. `None` when no source knows of any GPU.
pub fn visible_gpus() -> Option<GpuCount> {
    if let Ok(list) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return Some(GpuCount {
            count: count_visible_devices(&list),
            source: format!("CUDA_VISIBLE_DEVICES={list:?}"),
        });
    }
    if let Some(count) = nvidia_smi_count() {
        return Some(GpuCount {
            count,
            source: "nvidia-smi -L".into(),
        });
    }
    let count = std::fs::read_dir("/proc/driver/nvidia/gpus").ok()?.count();
    (count > 0).then(|| GpuCount {
        count,
        source: "/proc/driver/nvidia/gpus".into(),
    })
}

/// Entries CUDA would use: it stops at the first invalid one (and `-1` hides everything after it);
/// a device listed twice leaves none (as PyTorch's `_parse_visible_devices` reads it).
pub fn count_visible_devices(list: &str) -> usize {
    let devices: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .take_while(|d| !d.is_empty() && !d.starts_with('-'))
        .take_while(|d| {
            d.bytes().all(|b| b.is_ascii_digit()) || d.starts_with("GPU-") || d.starts_with("MIG-")
        })
        .collect();
    let distinct: std::collections::HashSet<&str> = devices.iter().copied().collect();
    match distinct.len() == devices.len() {
        true => devices.len(),
        false => 0,
    }
}

/// Lines `GPU n: ...` of `nvidia-smi -L`, with a timeout: a wedged driver must not hang the launcher.
fn nvidia_smi_count() -> Option<usize> {
    let mut child = Command::new("nvidia-smi")
        .arg("-L")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(
                    "nvidia-smi -L did not answer within 10 s; not counting GPUs with it"
                );
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take()?, &mut out).ok()?;
    let count = out.lines().filter(|l| l.starts_with("GPU ")).count();
    (count > 0).then_some(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_visible_devices_counting() {
        assert_eq!(count_visible_devices("0,1,2,3"), 4);
        assert_eq!(count_visible_devices(""), 0);
        assert_eq!(count_visible_devices("1,-1,2"), 1);
        assert_eq!(count_visible_devices("GPU-8f2a,GPU-11c0"), 2);
        assert_eq!(count_visible_devices("0, 1"), 2);
        assert_eq!(count_visible_devices("0,0"), 0, "a repeated device: none");
    }
}
