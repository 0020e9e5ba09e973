//! After the handshake: switch-over, final evidence, commit or rollback. spec: SPEC.md §8.7
//!
//! ```text
//! source                                   destination
//!   (pages on data streams ...)
//!   pause, last pages, device state, StreamEnd on every stream
//!   SwitchOver{stream_records, paused}  ->
//!                                  wait until every stream delivered that many records
//!                          <-  FinalChallenge{nonce}
//!   sign(final key, nonce, channel, order, transcript, digest)
//!   [strict: extend MigrationFinal(digest); quote(qd_final(nonce))]
//!   FinalEvidence{digest, signature[, evidence]}  ->
//!                                  digest == own digest, signature by the attested
//!                                  final key [strict: verify quote]
//!                          <-  Ready
//!   journal COMMIT (fsync)
//!   Commit  ->
//!                                  journal COMMIT, resume VM (unless paused)
//!                          <-  Resumed
//!   journal DONE, discard VM
//!   [not strict: extend MigrationFinal(digest); quote(qd_final(nonce))]
//!   FinalQuote{evidence}  ->
//!                                  verify: the record's evidence, or an incident
//! ```
//! Before the source journals COMMIT, every failure rolls back: the source resumes its VM and
//! the destination discards. After it, the source never resumes on its own; an in-doubt
//! migration is settled from the journals (SPEC.md §8.8).

use crate::attestation::{qualifying_data, Attester, EvidenceVerifier, Measurement, FINAL_LABEL};
use crate::error::{Error, PeerMisbehaved};
use crate::finalsig::{self, FinalContext, FinalKey};
use crate::handshake::{ChannelBinding, Established};
use crate::machine::{advance, decode, unexpected};
use crate::messages::Message;
use crate::order::{hex, OrderId};
use crate::{ct_eq, Digest};

/// Whether the VM may still be resumed on the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing committed: the source keeps (or resumes) its VM; the destination discards.
    RollBack,
    /// Committed: the destination owns the VM; the source must never resume it.
    Committed,
}

/// What a commit rests on, for the record (journal, audit trail): digests, nothing secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitEvidence {
    /// The handshake transcript's hash: both hellos and both agents' quotes.
    pub transcript: Digest,
    /// The root of the image manifest the source attested.
    pub manifest_root: Digest,
    /// The final digest the source signed and the destination matched.
    pub final_digest: Digest,
}

#[derive(Debug)]
enum SourcePhase {
    Transferring,
    AwaitChallenge { digest: Digest },
    AwaitReady,
    ReadyToCommit,
    AwaitResumed,
    Done,
}

impl SourcePhase {
    /// The message this phase waits for, for errors.
    fn expects(&self) -> &'static str {
        match self {
            Self::Transferring => "nothing (transferring)",
            Self::AwaitChallenge { .. } => "final-challenge",
            Self::AwaitReady => "ready",
            Self::ReadyToCommit => "nothing (committing)",
            Self::AwaitResumed => "resumed",
            Self::Done => "nothing (done)",
        }
    }
}

/// The source's control-plane state after the handshake.
pub struct SourceMigration {
    channel: ChannelBinding,
    order_id: OrderId,
    phase: Result<SourcePhase, Error>,
    // Set once `Ready` arrived (the driver may journal COMMIT from then on) and kept through
    // any later (sticky) error: after COMMIT the destination owns the VM whatever happens next.
    committed: bool,
    final_key: Option<FinalKey>,
    transcript_hash: Digest,
    strict: bool,
    /// Not strict: the digest and challenge the late quote covers, once signed.
    late: Option<(Digest, [u8; 32])>,
    /// The final digest once signed, and what it is recorded with.
    evidence: Option<CommitEvidence>,
    manifest_root: Digest,
}

/// The qualifying data of a final quote (SPEC.md §6.1).
fn final_qd(
    channel: &ChannelBinding,
    nonce: &[u8; 32],
    order_id: &OrderId,
    who: &[u8; 32],
) -> Digest {
    qualifying_data(FINAL_LABEL, nonce, &channel.tls_exporter, order_id, who)
}

/// What the source driver must do after a message.
#[derive(Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// Send this message.
    Send(Vec<u8>),
    /// The destination is ready: journal COMMIT durably, then call [`SourceMigration::commit`].
    ReadyToCommit,
    /// The destination runs the VM: journal DONE and discard the local copy.
    Resumed,
}

impl SourceMigration {
    /// State for the session `est` (its final key moves here).
    pub fn new(est: &mut Established) -> Self {
        Self {
            channel: est.channel.clone(),
            order_id: *est.order.id(),
            phase: Ok(SourcePhase::Transferring),
            committed: false,
            final_key: est.final_key.take(),
            transcript_hash: est.transcript_hash,
            strict: est.order.body().strict_final_quote,
            late: None,
            evidence: None,
            manifest_root: est.manifest_root,
        }
    }

    /// What the commit rests on, once the final digest is signed.
    pub fn evidence(&self) -> Option<CommitEvidence> {
        self.evidence
    }

    /// After `Resumed`, unless the order is strict: extend the final digest into the TPM and
    /// quote it for the destination's record (`FinalQuote`). `None` in strict mode (the quote
    /// went before `Commit`) or when called twice.
    pub fn final_quote(&mut self, attester: &mut dyn Attester) -> Result<Option<Vec<u8>>, Error> {
        if !matches!(self.phase, Ok(SourcePhase::Done)) {
            return Err(Error::ApiMisuse("final_quote before Resumed"));
        }
        let Some((digest, nonce)) = self.late.take() else {
            return Ok(None);
        };
        attester.extend(&Measurement::MigrationFinal(digest))?;
        let qd = final_qd(&self.channel, &nonce, &self.order_id, &self.channel.local);
        let evidence = attester.quote(&qd)?;
        Ok(Some(Message::FinalQuote { evidence }.encode()))
    }

    /// What a failure now means for the VM. `ReadyToCommit` counts as committed: the driver
    /// may already have journalled COMMIT, and the journal is the arbiter (SPEC.md §8.8).
    pub fn outcome_on_failure(&self) -> Outcome {
        if self.committed {
            Outcome::Committed
        } else {
            Outcome::RollBack
        }
    }

    /// The VM is paused and every stream ended: announce it. `digest` is the final image
    /// digest the engine computed; `paused`: the guest was stopped when the switch-over began,
    /// not by the migration, so the destination hands it over paused.
    pub fn switch_over(
        &mut self,
        stream_records: Vec<u64>,
        digest: Digest,
        paused: bool,
    ) -> Result<Vec<u8>, Error> {
        advance(&mut self.phase, SourcePhase::Done, |p| match p {
            SourcePhase::Transferring => Ok((SourcePhase::AwaitChallenge { digest }, ())),
            _ => Err(Error::ApiMisuse("switch_over twice")),
        })?;
        Ok(Message::SwitchOver {
            stream_records,
            paused,
        }
        .encode())
    }

    /// Handle a control message from the destination.
    pub fn handle(
        &mut self,
        raw: &[u8],
        attester: &mut dyn Attester,
    ) -> Result<SourceEvent, Error> {
        advance(&mut self.phase, SourcePhase::Done, |phase| {
            match (phase, decode(raw)?) {
                (SourcePhase::AwaitChallenge { digest }, Message::FinalChallenge { nonce }) => {
                    // Signed in microseconds by the key the handshake quote vouched for, then
                    // dropped (zeroized); the TPM quotes before `Commit` only in strict mode
                    // (SPEC.md §8.7).
                    let key = self.final_key.take().ok_or(Error::ApiMisuse(
                        "no final key (used already, or never given)",
                    ))?;
                    let ctx = FinalContext {
                        nonce: &nonce,
                        tls_exporter: &self.channel.tls_exporter,
                        order_id: &self.order_id,
                        transcript_hash: &self.transcript_hash,
                    };
                    let signature = key.sign(&ctx, &digest).to_vec();
                    self.evidence = Some(CommitEvidence {
                        transcript: self.transcript_hash,
                        manifest_root: self.manifest_root,
                        final_digest: digest,
                    });
                    let evidence = if self.strict {
                        attester.extend(&Measurement::MigrationFinal(digest))?;
                        let qd =
                            final_qd(&self.channel, &nonce, &self.order_id, &self.channel.local);
                        Some(attester.quote(&qd)?)
                    } else {
                        self.late = Some((digest, nonce));
                        None
                    };
                    let out = Message::FinalEvidence {
                        digest,
                        signature,
                        evidence,
                    };
                    Ok((SourcePhase::AwaitReady, SourceEvent::Send(out.encode())))
                }
                (SourcePhase::AwaitReady, Message::Ready) => {
                    self.committed = true;
                    Ok((SourcePhase::ReadyToCommit, SourceEvent::ReadyToCommit))
                }
                (SourcePhase::AwaitResumed, Message::Resumed) => {
                    Ok((SourcePhase::Done, SourceEvent::Resumed))
                }
                (p, m) => Err(unexpected(&m, p.expects())),
            }
        })
    }

    /// After COMMIT is durable in the journal: the message to send.
    pub fn commit(&mut self) -> Result<Vec<u8>, Error> {
        advance(&mut self.phase, SourcePhase::Done, |p| match p {
            SourcePhase::ReadyToCommit => Ok((SourcePhase::AwaitResumed, ())),
            _ => Err(Error::ApiMisuse("commit before the destination is ready")),
        })?;
        self.committed = true;
        Ok(Message::Commit.encode())
    }
}

#[derive(Debug)]
enum DestPhase {
    Receiving,
    AwaitStreams {
        stream_records: Vec<u64>,
    },
    AwaitFinalEvidence {
        nonce: [u8; 32],
        computed: Digest,
    },
    AwaitCommit,
    Committed,
    /// Resumed; not strict: the source's late quote of the final digest may come.
    AwaitFinalQuote,
    Done,
}

impl DestPhase {
    /// The message this phase waits for, for errors.
    fn expects(&self) -> &'static str {
        match self {
            Self::Receiving => "round-done or switch-over",
            Self::AwaitStreams { .. } => "nothing (draining streams)",
            Self::AwaitFinalEvidence { .. } => "final-evidence",
            Self::AwaitCommit => "commit",
            Self::AwaitFinalQuote => "final-quote",
            Self::Committed | Self::Done => "nothing (done)",
        }
    }
}

/// What the destination driver must do after a message.
#[derive(Debug, PartialEq, Eq)]
pub enum DestEvent {
    /// Informational (progress); nothing to do.
    None,
    /// Wait until each stream has delivered this many records, then call
    /// [`DestMigration::streams_complete`].
    AwaitStreams(Vec<u64>),
    /// Send this message.
    Send(Vec<u8>),
    /// Commit received: journal COMMIT durably, resume the VM, then call
    /// [`DestMigration::resumed`].
    Resume,
    /// The source's late quote of the final digest (after `Resumed`): `Ok` when it verifies and
    /// attests the digest that was signed and resumed, `Err` naming what did not: an incident
    /// to log, journal and report. The VM stays where it runs either way (SPEC.md §8.7).
    FinalQuote(Result<(), String>),
}

/// The destination's control-plane state after the handshake.
pub struct DestMigration {
    channel: ChannelBinding,
    order_id: OrderId,
    phase: Result<DestPhase, Error>,
    // Set when `Commit` arrived; survives later errors.
    committed: bool,
    peer_final_key: Option<[u8; 32]>,
    transcript_hash: Digest,
    strict: bool,
    /// Not strict: the digest and challenge the source's late quote must cover.
    late: Option<(Digest, [u8; 32])>,
    /// The final digest once verified, and what it is recorded with.
    evidence: Option<CommitEvidence>,
    manifest_root: Digest,
    /// The source's `SwitchOver` said the guest is handed over paused.
    paused: bool,
}

impl DestMigration {
    /// State for the session `est`.
    pub fn new(est: &Established) -> Self {
        Self {
            channel: est.channel.clone(),
            order_id: *est.order.id(),
            phase: Ok(DestPhase::Receiving),
            committed: false,
            peer_final_key: est.peer_final_key,
            transcript_hash: est.transcript_hash,
            strict: est.order.body().strict_final_quote,
            late: None,
            evidence: None,
            manifest_root: est.manifest_root,
            paused: false,
        }
    }

    /// Whether the VM is handed over paused, as it was at the source when it switched over
    /// (its `SwitchOver` said so): after `Commit` the destination does not resume it.
    pub fn hands_over_paused(&self) -> bool {
        self.paused
    }

    /// What the commit rests on, once the source's final evidence verified.
    pub fn evidence(&self) -> Option<CommitEvidence> {
        self.evidence
    }

    /// Whether the source's late quote is still to come (after `Resumed`, not strict).
    pub fn awaits_final_quote(&self) -> bool {
        matches!(self.phase, Ok(DestPhase::AwaitFinalQuote))
    }

    /// What a failure now means: before `Commit` arrived the destination discards.
    pub fn outcome_on_failure(&self) -> Outcome {
        if self.committed {
            Outcome::Committed
        } else {
            Outcome::RollBack
        }
    }

    /// Handle a control message from the source.
    pub fn handle(
        &mut self,
        raw: &[u8],
        verifier: &dyn EvidenceVerifier,
    ) -> Result<DestEvent, Error> {
        advance(&mut self.phase, DestPhase::Done, |phase| {
            match (phase, decode(raw)?) {
                (DestPhase::Receiving, Message::RoundDone { .. }) => {
                    Ok((DestPhase::Receiving, DestEvent::None))
                }
                (
                    DestPhase::Receiving,
                    Message::SwitchOver {
                        stream_records,
                        paused,
                    },
                ) => {
                    self.paused = paused;
                    let event = DestEvent::AwaitStreams(stream_records.clone());
                    Ok((DestPhase::AwaitStreams { stream_records }, event))
                }
                (
                    DestPhase::AwaitFinalEvidence { nonce, computed },
                    Message::FinalEvidence {
                        digest,
                        signature,
                        evidence,
                    },
                ) => {
                    if !ct_eq(&digest, &computed) {
                        return Err(PeerMisbehaved::FinalDigestMismatch {
                            attested: hex(&digest),
                            computed: hex(&computed),
                        }
                        .into());
                    }
                    let key = self
                        .peer_final_key
                        .ok_or(Error::ApiMisuse("session without the source's final key"))?;
                    let ctx = FinalContext {
                        nonce: &nonce,
                        tls_exporter: &self.channel.tls_exporter,
                        order_id: &self.order_id,
                        transcript_hash: &self.transcript_hash,
                    };
                    finalsig::verify(&key, &signature, &ctx, &digest)?;
                    match (self.strict, evidence) {
                        (true, Some(evidence)) => {
                            let qd =
                                final_qd(&self.channel, &nonce, &self.order_id, &self.channel.peer);
                            verify_final_quote(
                                verifier,
                                &evidence,
                                &qd,
                                &self.channel.peer,
                                &digest,
                            )?;
                        }
                        (true, None) => {
                            return Err(PeerMisbehaved::BadField(
                                "the order is strict: final evidence without the TPM quote".into(),
                            )
                            .into())
                        }
                        (false, Some(_)) => {
                            return Err(PeerMisbehaved::BadField(
                                "final evidence carries a quote the order did not ask for".into(),
                            )
                            .into())
                        }
                        (false, None) => self.late = Some((digest, nonce)),
                    }
                    self.evidence = Some(CommitEvidence {
                        transcript: self.transcript_hash,
                        manifest_root: self.manifest_root,
                        final_digest: digest,
                    });
                    Ok((
                        DestPhase::AwaitCommit,
                        DestEvent::Send(Message::Ready.encode()),
                    ))
                }
                (DestPhase::AwaitFinalQuote, Message::FinalQuote { evidence }) => {
                    let (digest, nonce) = self
                        .late
                        .ok_or(Error::ApiMisuse("a late quote without a signed digest"))?;
                    let qd = final_qd(&self.channel, &nonce, &self.order_id, &self.channel.peer);
                    let verdict =
                        verify_final_quote(verifier, &evidence, &qd, &self.channel.peer, &digest)
                            .map_err(|e| e.to_string());
                    Ok((DestPhase::Done, DestEvent::FinalQuote(verdict)))
                }
                (DestPhase::AwaitCommit, Message::Commit) => {
                    self.committed = true;
                    Ok((DestPhase::Committed, DestEvent::Resume))
                }
                (p, m) => Err(unexpected(&m, p.expects())),
            }
        })
    }

    /// Every stream delivered its records: check the counts, then challenge the source for its
    /// final evidence. `computed` is the destination's own final digest; `nonce` fresh random.
    pub fn streams_complete(
        &mut self,
        received: &[u64],
        computed: Digest,
        nonce: [u8; 32],
    ) -> Result<Vec<u8>, Error> {
        advance(&mut self.phase, DestPhase::Done, |p| {
            match p {
            DestPhase::AwaitStreams { stream_records } if stream_records.as_slice() == received => {
                Ok((DestPhase::AwaitFinalEvidence { nonce, computed }, ()))
            }
            DestPhase::AwaitStreams { stream_records } => Err(PeerMisbehaved::BadField(format!(
                "source sent {stream_records:?} records per stream, destination received {received:?}"
            ))
            .into()),
            _ => Err(Error::ApiMisuse("streams_complete before switch-over")),
        }
        })?;
        Ok(Message::FinalChallenge { nonce }.encode())
    }

    /// The VM runs here now (COMMIT journalled): the message to send.
    pub fn resumed(&mut self) -> Result<Vec<u8>, Error> {
        let next = if self.late.is_some() {
            DestPhase::AwaitFinalQuote
        } else {
            DestPhase::Done
        };
        advance(&mut self.phase, DestPhase::Done, |p| match p {
            DestPhase::Committed => Ok((next, ())),
            _ => Err(Error::ApiMisuse("resumed before commit")),
        })?;
        Ok(Message::Resumed.encode())
    }
}

/// A final quote verifies and attests `digest` as the migration-final event.
fn verify_final_quote(
    verifier: &dyn EvidenceVerifier,
    evidence: &[u8],
    qd: &Digest,
    peer: &[u8; 32],
    digest: &Digest,
) -> Result<(), Error> {
    let claims = verifier.verify(evidence, qd, peer)?;
    let attested = *claims.migration_final().ok_or_else(|| {
        Error::Attestation(crate::attestation::AttestationError::new(
            "final evidence carries no migration-final event",
        ))
    })?;
    if !ct_eq(&attested, digest) {
        return Err(PeerMisbehaved::FinalDigestMismatch {
            attested: hex(&attested),
            computed: hex(digest),
        }
        .into());
    }
    Ok(())
}
