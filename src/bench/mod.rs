//! `saepipe bench <what>`: throughput and peak memory, printed as a table.
//!
//! Timing is printed, never asserted (STYLE.md §2.9 rule 7).

pub mod capture;

/// Peak resident set size of this process in bytes (`VmHWM` of `/proc/self/status`),
/// `None` where that file does not exist (non-Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_is_positive_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(super::peak_rss_bytes().unwrap() > 1 << 20);
        }
    }
}
