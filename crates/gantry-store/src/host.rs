//! What the host can hold, read from the files the kernel keeps about it.

/// `MemAvailable` of `/proc/meminfo` in bytes: the memory new allocations can get without
/// swapping. `None` where the file is missing or unreadable (not Linux).
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_linux_host_reports_some_available_memory() {
        if std::path::Path::new("/proc/meminfo").exists() {
            let bytes = super::available_memory_bytes().expect("MemAvailable in /proc/meminfo");
            assert!(bytes > 1 << 20, "{bytes} bytes");
        }
    }
}
