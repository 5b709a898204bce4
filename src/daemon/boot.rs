//! Which boot of the host the daemon runs in. A primary's write reaches its
//! image and its journal record separately, and only a flush makes both
//! durable: after a power loss the image may hold writes whose records were
//! lost (the page cache wrote the image back, not the journal), and the
//! stream would never carry them to the DR site. A process crash (kill -9)
//! loses no page cache, so only a restart of the host calls for the tree
//! comparison that finds them. The marker `DIR/boot` holds the kernel's boot
//! id while the daemon runs; an orderly stop removes it.

use std::path::{Path, PathBuf};

const MARKER: &str = "boot";

fn marker(dir: &Path) -> PathBuf {
    dir.join(MARKER)
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
fn boot_id() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_string())
}

/// Whether the daemon last ran in another boot of the host without an
/// orderly stop; then marks this boot, durably, before anything is opened.
pub fn check_and_mark(dir: &Path) -> anyhow::Result<bool> {
    let now = boot_id().map_err(|e| anyhow::anyhow!("cannot read the host's boot id: {e}"))?;
    let path = marker(dir);
    let rebooted = match std::fs::read_to_string(&path) {
        Ok(before) => before.trim() != now,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    };
    crate::util::write_atomic(&path, format!("{now}\n").as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    crate::fsio::set_boot_marker(path);
    Ok(rebooted)
}

/// After an orderly stop that made every image and journal durable.
pub fn clear(dir: &Path) {
    let path = marker(dir);
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::warn!(error = %e, "cannot remove {}", path.display());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_start_in_another_boot_without_an_orderly_stop_counts() {
        let d = tempfile::tempdir().unwrap();
        assert!(!super::check_and_mark(d.path()).unwrap(), "a first start");
        assert!(
            !super::check_and_mark(d.path()).unwrap(),
            "a crash, same boot"
        );
        std::fs::write(d.path().join("boot"), "another boot\n").unwrap();
        assert!(super::check_and_mark(d.path()).unwrap(), "a power loss");
        super::clear(d.path());
        assert!(
            !super::check_and_mark(d.path()).unwrap(),
            "after an orderly stop"
        );
    }
}
