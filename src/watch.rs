//! When to re-read the files snapguard serves from (config, TLS certificates, signing keys).
//!
//! A file-system watch on each file's *directory*, not on the file: Kubernetes updates a mounted
//! ConfigMap or Secret by writing a new timestamped directory and renaming a `..data` symlink
//! over the old one, which a watch on the file itself (an inode about to be orphaned) never
//! sees. An event is only a hint: the callers compare what they read with what is in force, and
//! keep re-reading on a timer as well, because a watch can fail to start (inotify limits) and
//! network file systems send no events.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;

/// How long to let a burst of events settle (the kubelet writes several files, then swaps the
/// symlink) before re-reading, so that one change is read once and whole.
const SETTLE: Duration = Duration::from_millis(100);

/// Wakes its owner when something changed in the directory of a watched file.
pub struct Changes {
    changed: Arc<Notify>,
    /// Kept for its `Drop`, which ends the watch.
    _watcher: Option<RecommendedWatcher>,
}

impl Changes {
    /// Watches the directories of `files`; `what` names them in the warning logged when the
    /// watch cannot start (re-reading on the timer still works then).
    pub fn watch<'a>(what: &str, files: impl IntoIterator<Item = &'a Path>) -> Self {
        let changed = Arc::new(Notify::new());
        let dirs: BTreeSet<PathBuf> = files.into_iter().map(directory_of).collect();
        let watcher = match start(&dirs, changed.clone()) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                tracing::warn!(
                    files = what,
                    error = %e,
                    "cannot watch for file changes; re-reading on the timer only"
                );
                None
            }
        };
        Changes {
            changed,
            _watcher: watcher,
        }
    }

    /// Returns when a watched directory changed (after the burst settled) or `fallback` passed,
    /// whichever comes first.
    pub async fn next(&self, fallback: Duration) {
        tokio::select! {
            () = self.changed.notified() => tokio::time::sleep(SETTLE).await,
            () = tokio::time::sleep(fallback) => {}
        }
    }
}

/// The directory holding `file` (`.` for a bare file name).
fn directory_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn start(dirs: &BTreeSet<PathBuf>, changed: Arc<Notify>) -> notify::Result<RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads (ours among them) change nothing; an error may have lost events, so re-read.
        if !matches!(event, Ok(ref e) if matches!(e.kind, EventKind::Access(_))) {
            changed.notify_one();
        }
    })?;
    for dir in dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_file_name_is_watched_in_the_working_directory() {
        assert_eq!(directory_of(Path::new("cert.pem")), PathBuf::from("."));
        assert_eq!(
            directory_of(Path::new("/etc/tls/cert.pem")),
            PathBuf::from("/etc/tls")
        );
    }

    /// The Kubernetes way: files in a timestamped directory, reached through a `..data` symlink
    /// that is renamed over; the watch on the mount directory sees the swap.
    #[tokio::test]
    async fn a_symlink_swap_in_the_directory_wakes_the_watch() -> std::io::Result<()> {
        let mount = std::env::temp_dir().join(format!("snapguard-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&mount);
        std::fs::create_dir_all(mount.join("..2026_1"))?;
        std::fs::write(mount.join("..2026_1/cert.pem"), "one")?;
        std::os::unix::fs::symlink("..2026_1", mount.join("..data"))?;
        std::os::unix::fs::symlink("..data/cert.pem", mount.join("cert.pem"))?;

        let changes = Changes::watch("test", [mount.join("cert.pem").as_path()]);
        std::fs::create_dir_all(mount.join("..2026_2"))?;
        std::fs::write(mount.join("..2026_2/cert.pem"), "two")?;
        std::os::unix::fs::symlink("..2026_2", mount.join("..data_tmp"))?;
        std::fs::rename(mount.join("..data_tmp"), mount.join("..data"))?;

        // The fallback is an hour: returning at all means the event woke it.
        let woke = tokio::time::timeout(
            Duration::from_secs(10),
            changes.next(Duration::from_secs(3600)),
        )
        .await;
        let _ = std::fs::remove_dir_all(&mount);
        assert!(woke.is_ok(), "the swap of ..data was not seen");
        Ok(())
    }
}
