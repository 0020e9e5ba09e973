//! Crash points for the system tests, debug builds only: with `TRUSTMIG_TEST_CRASH_AT=<point>`
//! the agent exits at once when it reaches that point, as a SIGKILL would leave it (nothing
//! flushed, no message sent, the hypervisor left as it is). Release builds contain none of it.

/// The environment variable naming the crash point.
pub const CRASH_AT_ENV: &str = "TRUSTMIG_TEST_CRASH_AT";

/// Where an agent can be made to crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// The source received `FinalChallenge` (its QEMU completed; nothing is committed).
    SourceFinalChallenge,
    /// The destination is about to send `FinalChallenge` (its QEMU loaded the whole stream).
    DestinationFinalChallenge,
}

impl CrashPoint {
    /// The point's name in [`CRASH_AT_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Self::SourceFinalChallenge => "source-final-challenge",
            Self::DestinationFinalChallenge => "destination-final-challenge",
        }
    }
}

/// Exit here (code 137, as after SIGKILL) when the environment names `point`.
pub fn crash_point(point: CrashPoint) {
    #[cfg(debug_assertions)]
    if std::env::var(CRASH_AT_ENV).is_ok_and(|v| v == point.name()) {
        tracing::error!("test crash point {}: exiting now", point.name());
        std::process::exit(137);
    }
    let _ = point;
}
