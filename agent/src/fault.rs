//! Fault injection for the system tests, behind the agent's cargo feature `fault-injection`.
//! The tests crate (`trustmig-tests`) depends on the agent with it, so any build that includes
//! that crate has it: `cargo test`, and a workspace-wide `cargo build`. A build of the agent
//! alone (`cargo build -p trustmig-agent`, as the README, `demo.sh`, `bench/` and packaging do)
//! has none of it: every function here is then an empty stub the compiler removes, and the
//! agent logs a warning at start when it is compiled in. The faults are read once, from the
//! environment, when the agent starts ([`init`]); each call site is one line.
//!
//! | variable | fault |
//! |---|---|
//! | `TRUSTMIG_TEST_CRASH_AT=<point>` | exit at once at a [`CrashPoint`], as a SIGKILL would |
//! | `TRUSTMIG_TEST_LOSE_COMMIT` | the source loses its session after journalling COMMIT, before `Commit` |
//! | `TRUSTMIG_TEST_SETTLE_BEFORE_COMMIT` | the source asks for a settlement after COMMIT, then sends `Commit` (a late `Commit`) |
//! | `TRUSTMIG_TEST_LOSE_RESUMED` | the destination resumes, then fails before `Resumed` |
//! | `TRUSTMIG_TEST_JOURNAL_BREAKS_AT_COMMIT` | the destination's COMMIT line is written whole, then the write fails and cannot be cut back (a failing disk): the journal refuses appends from then on |
//! | `TRUSTMIG_TEST_JOURNAL_FAILS=<role>:<state>:<n>` | the first n journal records of that role and state (`destination:done:3`, `source:rolled-back:1`) fail cleanly (cut back: the file as it was), as on a full disk |
//! | `TRUSTMIG_TEST_SETTLE_UNANSWERED=<n>` | the first n settlement queries go unanswered |
//! | `TRUSTMIG_TEST_ALTER_DISK_CHUNK=<k>` | disk chunk k is altered after the source checked it |
//! | `TRUSTMIG_TEST_ALTER_MIRRORED_IMAGE=1` | the destination alters each copy verified in full before hashing it |

/// Whether fault injection is compiled in: call sites that need work to find their point
/// (decoding a message, say) test this first, so a build without it does none of that work.
pub const ENABLED: bool = cfg!(feature = "fault-injection");

/// `TRUSTMIG_TEST_CRASH_AT`: the crash point.
pub const CRASH_AT_ENV: &str = "TRUSTMIG_TEST_CRASH_AT";
/// `TRUSTMIG_TEST_LOSE_COMMIT`.
pub const LOSE_COMMIT_ENV: &str = "TRUSTMIG_TEST_LOSE_COMMIT";
/// `TRUSTMIG_TEST_SETTLE_BEFORE_COMMIT`.
pub const SETTLE_BEFORE_COMMIT_ENV: &str = "TRUSTMIG_TEST_SETTLE_BEFORE_COMMIT";
/// `TRUSTMIG_TEST_LOSE_RESUMED`.
pub const LOSE_RESUMED_ENV: &str = "TRUSTMIG_TEST_LOSE_RESUMED";
/// `TRUSTMIG_TEST_JOURNAL_BREAKS_AT_COMMIT`.
pub const JOURNAL_BREAKS_AT_COMMIT_ENV: &str = "TRUSTMIG_TEST_JOURNAL_BREAKS_AT_COMMIT";
/// `TRUSTMIG_TEST_JOURNAL_FAILS`.
pub const JOURNAL_FAILS_ENV: &str = "TRUSTMIG_TEST_JOURNAL_FAILS";
/// `TRUSTMIG_TEST_HAND_OVER_PAUSED`: the source's `SwitchOver` says the guest was paused
/// before the migration, whatever it was (a peer asking what a synthetic destination cannot do).
pub const HAND_OVER_PAUSED_ENV: &str = "TRUSTMIG_TEST_HAND_OVER_PAUSED";
/// `TRUSTMIG_TEST_SETTLE_UNANSWERED`.
pub const SETTLE_UNANSWERED_ENV: &str = "TRUSTMIG_TEST_SETTLE_UNANSWERED";
/// `TRUSTMIG_TEST_HOLD`: `POINT:MS`, the agent waits MS milliseconds at [`Hold`] point POINT
/// (so a test can act there), saying so in its log first.
pub const HOLD_ENV: &str = "TRUSTMIG_TEST_HOLD";

/// Where an agent can be made to wait ([`HOLD_ENV`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// A QEMU source, between preparing an order and claiming its VM (a reload meanwhile).
    BeforeClaim,
    /// A QEMU source giving its VM back, before its `cont` (an image lock taken meanwhile).
    BeforeGiveBack,
    /// A destination that journalled COMMIT, before it starts the VM (an image lock taken
    /// meanwhile).
    BeforeResume,
}

impl Hold {
    #[cfg(feature = "fault-injection")]
    const ALL: [Self; 3] = [Self::BeforeClaim, Self::BeforeGiveBack, Self::BeforeResume];

    /// The point's name in [`HOLD_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Self::BeforeClaim => "before-claim",
            Self::BeforeGiveBack => "before-give-back",
            Self::BeforeResume => "before-resume",
        }
    }

    /// `HOLD_ENV`'s value that holds here for `ms` milliseconds.
    pub fn env(self, ms: u64) -> String {
        format!("{}:{ms}", self.name())
    }

    /// What the agent logs as it begins to hold here.
    pub fn logged(self) -> String {
        format!("fault injection: holding {}", self.name())
    }

    #[cfg(feature = "fault-injection")]
    fn parse(v: &str) -> Option<(Self, u64)> {
        let (name, ms) = v.split_once(':')?;
        let hold = Self::ALL.into_iter().find(|h| h.name() == name)?;
        Some((hold, ms.parse().ok()?))
    }
}
/// `TRUSTMIG_TEST_ALTER_DISK_CHUNK`.
pub const ALTER_DISK_CHUNK_ENV: &str = "TRUSTMIG_TEST_ALTER_DISK_CHUNK";
/// Destination: alter a byte of each copy verified in full (`verify = "full"`) after its NBD
/// stream ended, before it is hashed (a copy that diverged from what the mirror sent).
pub const ALTER_MIRRORED_IMAGE_ENV: &str = "TRUSTMIG_TEST_ALTER_MIRRORED_IMAGE";

/// Where an agent can be made to crash: every point where its journal changes, and one in
/// the middle of the transfer (the crash matrix, SPEC.md §8.9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// The source journalled the order's claim (nothing moved yet).
    SourceAfterClaim,
    /// The source reported its first pre-copy round (the transfer is under way).
    SourceMidTransfer,
    /// The source received `FinalChallenge` (its QEMU completed; nothing is committed).
    SourceFinalChallenge,
    /// The source journalled COMMIT (before `Commit` left).
    SourceAfterCommit,
    /// The source journalled DONE.
    SourceAfterDone,
    /// The destination journalled the order's claim.
    DestinationAfterClaim,
    /// The destination opened its 16th data record (the transfer is under way).
    DestinationMidTransfer,
    /// The destination is about to send `FinalChallenge` (its QEMU loaded the whole stream).
    DestinationFinalChallenge,
    /// The destination journalled COMMIT (before it resumed the VM and sent `Resumed`).
    DestinationAfterCommit,
    /// The destination journalled DONE.
    DestinationAfterDone,
}

impl CrashPoint {
    /// Every point.
    pub const ALL: [Self; 10] = [
        Self::SourceAfterClaim,
        Self::SourceMidTransfer,
        Self::SourceFinalChallenge,
        Self::SourceAfterCommit,
        Self::SourceAfterDone,
        Self::DestinationAfterClaim,
        Self::DestinationMidTransfer,
        Self::DestinationFinalChallenge,
        Self::DestinationAfterCommit,
        Self::DestinationAfterDone,
    ];

    /// The point's name in [`CRASH_AT_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Self::SourceAfterClaim => "source-after-claim",
            Self::SourceMidTransfer => "source-mid-transfer",
            Self::SourceFinalChallenge => "source-final-challenge",
            Self::SourceAfterCommit => "source-after-commit",
            Self::SourceAfterDone => "source-after-done",
            Self::DestinationAfterClaim => "destination-after-claim",
            Self::DestinationMidTransfer => "destination-mid-transfer",
            Self::DestinationFinalChallenge => "destination-final-challenge",
            Self::DestinationAfterCommit => "destination-after-commit",
            Self::DestinationAfterDone => "destination-after-done",
        }
    }

    /// Whether the point is in the source agent (else the destination).
    pub fn in_source(self) -> bool {
        self.name().starts_with("source")
    }
}

#[cfg(feature = "fault-injection")]
mod on {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    use trustmig_protocol::order::Role;

    use super::*;
    use crate::journal::State;

    /// The faults this process was started with.
    #[derive(Debug, Default)]
    pub(super) struct Faults {
        pub crash_at: Option<CrashPoint>,
        pub lose_commit: bool,
        pub settle_before_commit: bool,
        pub lose_resumed: bool,
        pub journal_breaks_at_commit: bool,
        pub journal_fails: Option<(Role, State, AtomicU64)>,
        pub hand_over_paused: bool,
        pub unanswered: u64,
        pub alter_disk_chunk: Option<u64>,
        pub alter_mirrored_image: bool,
        pub hold: Option<(Hold, u64)>,
        pub asked: AtomicU64,
        pub records: AtomicU64,
    }

    pub(super) static FAULTS: OnceLock<Faults> = OnceLock::new();

    pub(super) fn read_env() -> Faults {
        let var = |k: &str| std::env::var(k).ok();
        Faults {
            crash_at: var(CRASH_AT_ENV)
                .and_then(|v| CrashPoint::ALL.into_iter().find(|p| p.name() == v)),
            lose_commit: var(LOSE_COMMIT_ENV).is_some(),
            settle_before_commit: var(SETTLE_BEFORE_COMMIT_ENV).is_some(),
            lose_resumed: var(LOSE_RESUMED_ENV).is_some(),
            journal_breaks_at_commit: var(JOURNAL_BREAKS_AT_COMMIT_ENV).is_some(),
            journal_fails: var(JOURNAL_FAILS_ENV).and_then(|v| journal_fails(&v)),
            hand_over_paused: var(HAND_OVER_PAUSED_ENV).is_some(),
            unanswered: var(SETTLE_UNANSWERED_ENV)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            alter_disk_chunk: var(ALTER_DISK_CHUNK_ENV).and_then(|v| v.parse().ok()),
            alter_mirrored_image: var(ALTER_MIRRORED_IMAGE_ENV).is_some(),
            hold: var(HOLD_ENV).and_then(|v| Hold::parse(&v)),
            asked: AtomicU64::new(0),
            records: AtomicU64::new(0),
        }
    }

    /// `role:state:n` of [`JOURNAL_FAILS_ENV`], in the journal's own spelling.
    fn journal_fails(v: &str) -> Option<(Role, State, AtomicU64)> {
        let mut parts = v.split(':');
        let word = |w: Option<&str>| Some(serde_json::Value::String(w?.to_string()));
        let role = serde_json::from_value(word(parts.next())?).ok()?;
        let state = serde_json::from_value(word(parts.next())?).ok()?;
        let n = parts.next()?.parse().ok()?;
        Some((role, state, AtomicU64::new(n)))
    }

    pub(super) fn faults() -> &'static Faults {
        FAULTS.get_or_init(read_env)
    }

    pub(super) fn next_query_unanswered() -> bool {
        let f = faults();
        f.asked.fetch_add(1, Ordering::SeqCst) < f.unanswered
    }
}

/// Read the faults from the environment (once; later calls change nothing). The agent calls
/// this at start, so a fault cannot appear halfway through a run.
pub fn init() {
    #[cfg(feature = "fault-injection")]
    {
        let f = on::faults();
        tracing::warn!(
            ?f,
            "fault injection is compiled in (feature fault-injection)"
        );
    }
}

/// Exit here (code 137, as after SIGKILL) when the agent was started to crash at `point`.
pub fn crash_point(point: CrashPoint) {
    #[cfg(feature = "fault-injection")]
    if on::faults().crash_at == Some(point) {
        tracing::error!("fault injection: crash point {}: exiting now", point.name());
        std::process::exit(137);
    }
    let _ = point;
}

/// The destination opened a data record: [`CrashPoint::DestinationMidTransfer`] at the 16th.
pub fn record_opened() {
    #[cfg(feature = "fault-injection")]
    if on::faults().crash_at == Some(CrashPoint::DestinationMidTransfer)
        && on::faults()
            .records
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            == 15
    {
        crash_point(CrashPoint::DestinationMidTransfer);
    }
}

/// The source's session is lost right after COMMIT was journalled, before `Commit` leaves.
pub fn lose_commit() -> bool {
    #[cfg(feature = "fault-injection")]
    return on::faults().lose_commit;
    #[cfg(not(feature = "fault-injection"))]
    false
}

/// The source asks for a settlement after journalling COMMIT, before `Commit` leaves.
pub fn settle_before_commit() -> bool {
    #[cfg(feature = "fault-injection")]
    return on::faults().settle_before_commit;
    #[cfg(not(feature = "fault-injection"))]
    false
}

/// The destination fails after resuming the VM, before `Resumed` leaves.
pub fn lose_resumed() -> bool {
    #[cfg(feature = "fault-injection")]
    return on::faults().lose_resumed;
    #[cfg(not(feature = "fault-injection"))]
    false
}

/// The destination's COMMIT record is written whole and then reported failed, the journal
/// broken (a write whose `fsync` and cut-back both failed leaves its line in the file).
pub fn journal_breaks_at(
    role: trustmig_protocol::order::Role,
    state: crate::journal::State,
) -> bool {
    #[cfg(feature = "fault-injection")]
    return on::faults().journal_breaks_at_commit
        && role == trustmig_protocol::order::Role::Destination
        && state == crate::journal::State::Committed;
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = (role, state);
        false
    }
}

/// A journal record of this role and state fails cleanly, as on a full disk (nothing
/// written), while [`JOURNAL_FAILS_ENV`]'s count lasts.
pub fn journal_fails_at(
    role: trustmig_protocol::order::Role,
    state: crate::journal::State,
) -> bool {
    #[cfg(feature = "fault-injection")]
    return on::faults()
        .journal_fails
        .as_ref()
        .is_some_and(|(r, s, left)| {
            (*r, *s) == (role, state)
                && left
                    .fetch_update(
                        std::sync::atomic::Ordering::SeqCst,
                        std::sync::atomic::Ordering::SeqCst,
                        |n| n.checked_sub(1),
                    )
                    .is_ok()
        });
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = (role, state);
        false
    }
}

/// The source's `SwitchOver` says the guest is handed over paused, whatever it was.
pub fn hand_over_paused() -> bool {
    #[cfg(feature = "fault-injection")]
    return on::faults().hand_over_paused;
    #[cfg(not(feature = "fault-injection"))]
    false
}

/// Whether this settlement query is one of the first n that go unanswered.
pub fn query_unanswered() -> bool {
    #[cfg(feature = "fault-injection")]
    return on::next_query_unanswered();
    #[cfg(not(feature = "fault-injection"))]
    false
}

/// Whether disk chunk `index` (counting over all disks) is to be altered after its check.
pub fn alter_disk_chunk(index: u64) -> bool {
    #[cfg(feature = "fault-injection")]
    return on::faults().alter_disk_chunk == Some(index);
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = index;
        false
    }
}

/// Whether the destination alters each copy verified in full before hashing it.
pub fn alter_mirrored_image() -> bool {
    #[cfg(feature = "fault-injection")]
    return on::faults().alter_mirrored_image;
    #[cfg(not(feature = "fault-injection"))]
    false
}

/// Wait here, if the agent was started to hold at `point` ([`HOLD_ENV`]).
pub async fn hold(point: Hold) {
    #[cfg(feature = "fault-injection")]
    if let Some((at, ms)) = on::faults().hold {
        if at == point {
            tracing::warn!(ms, "{}", point.logged());
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    }
    let _ = point;
}
