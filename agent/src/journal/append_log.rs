//! An append-only file of lines (the journal, the audit trail): each line is durable before
//! it counts, or it is not in the file at all.
//!
//! A write or a sync that fails (a full disk, an I/O error) may leave part of the line in the
//! file, or all of it without knowing whether it will last. Left there, the next line would
//! land after a fragment, which a replay can only call corrupt (the agent would not start
//! again), or a record whose write was reported failed would be found at the next start, as
//! if it had been acted on. So a failed append cuts the file back to where it was and makes
//! that durable; if even that fails, the log refuses every later append, and the next start
//! cuts the torn tail (a last line without its newline was never acknowledged).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::AgentError;

/// The open file and the length of what it holds that counts.
pub(crate) struct AppendLog {
    path: PathBuf,
    file: File,
    len: u64,
    /// Why appends are refused: a failed one could not be cut back.
    broken: Option<String>,
    /// Tests: the next append writes this many bytes of its line, then fails.
    #[cfg(test)]
    pub(crate) fail_after: Option<usize>,
}

impl AppendLog {
    /// Open (or create) the file at `path` for appending, first cutting a torn last line at
    /// `torn_at` (a crash mid-append: the caller never acted on it).
    pub(crate) fn open(path: &Path, torn_at: Option<u64>) -> Result<Self, AgentError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(AgentError::io(path))?;
        if let Some(len) = torn_at {
            file.set_len(len)
                .and_then(|()| file.sync_all())
                .map_err(AgentError::io(path))?;
        }
        let len = file.metadata().map_err(AgentError::io(path))?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len,
            broken: None,
            #[cfg(test)]
            fail_after: None,
        })
    }

    /// Refuse every later append, for `why` (the file this handle holds is no longer the one
    /// at the path).
    pub(crate) fn refuse(&mut self, why: String) {
        self.broken = Some(why);
    }

    /// Whether appends are refused (a failed one could not be cut back).
    pub(crate) fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Why appends are refused, if they are.
    pub(crate) fn broken_because(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Append `line` (ending in a newline) and make it durable, or leave the file as it was.
    pub(crate) fn append(&mut self, line: &[u8]) -> Result<(), AgentError> {
        debug_assert!(line.ends_with(b"\n"));
        if let Some(why) = &self.broken {
            return Err(AgentError::Journal(format!(
                "{}: no more appends: an earlier one failed and could not be undone ({why}); fix the disk, then restart the agent: its start reads the file as it is (a torn last line is cut) and settles what it holds",
                self.path.display()
            )));
        }
        let written = self.write(line).and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            let undone = self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_all());
            if let Err(undo) = undone {
                self.broken = Some(format!("{e}; cutting it off: {undo}"));
            }
            return Err(AgentError::io(&self.path)(e));
        }
        self.len += line.len() as u64;
        Ok(())
    }

    /// Fault injection: `line` goes into the file whole, then the append fails as one whose
    /// `fsync` and cut-back both failed would (the line stays; no more appends).
    pub(crate) fn append_then_break(&mut self, line: &[u8]) -> Result<(), AgentError> {
        let e =
            std::io::Error::other("fault injection: fsync failed, and cutting the line off too");
        if let Err(e) = self.file.write_all(line) {
            return Err(AgentError::io(&self.path)(e));
        }
        self.broken = Some(e.to_string());
        Err(AgentError::io(&self.path)(e))
    }

    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(n) = self.fail_after.take() {
            self.file.write_all(&line[..n.min(line.len())])?;
            return Err(std::io::Error::other("fault injection: no space left"));
        }
        self.file.write_all(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_append_leaves_the_file_as_it_was_and_the_next_one_lands_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut log = AppendLog::open(&path, None).unwrap();
        log.append(b"one\n").unwrap();
        for fail_after in [0, 3, 4] {
            log.fail_after = Some(fail_after);
            assert!(log.append(b"two\n").is_err());
            assert_eq!(std::fs::read(&path).unwrap(), b"one\n", "{fail_after}");
        }
        log.append(b"three\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\nthree\n");
        // Reopened, it appends after what is there; a torn tail is cut first.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"fou")
            .unwrap();
        let mut log = AppendLog::open(&path, Some(10)).unwrap();
        log.append(b"four\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\nthree\nfour\n");
    }
}
