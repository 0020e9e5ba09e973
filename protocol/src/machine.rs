//! What the message-driven state machines (handshake, migration) share: a peer's message
//! decoded, with its `abort` turned into the error it reports; a message out of turn named; and
//! sticky errors, so that a machine that failed once answers every later call with that error.

use crate::error::{Error, PeerMisbehaved};
use crate::messages::Message;

/// Decode a peer's message; `Abort` becomes [`Error::PeerAborted`], its reason as kept
/// ([`crate::messages::peer_reason`]).
pub(crate) fn decode(raw: &[u8]) -> Result<Message, Error> {
    match Message::decode(raw)? {
        Message::Abort { code, reason } => Err(Error::PeerAborted {
            code,
            reason: crate::messages::peer_reason(&reason),
        }),
        m => Ok(m),
    }
}

/// `got` arrived where the machine waits for `expected`.
pub(crate) fn unexpected(got: &Message, expected: &'static str) -> Error {
    PeerMisbehaved::UnexpectedMessage {
        got: got.name(),
        expected,
    }
    .into()
}

/// Run one transition on the state in `slot`: `step` takes the state (`taken` stands in
/// meanwhile) and gives the next one and its output. A failed step, or a state failed before,
/// leaves (and returns) the error.
pub(crate) fn advance<S, T>(
    slot: &mut Result<S, Error>,
    taken: S,
    step: impl FnOnce(S) -> Result<(S, T), Error>,
) -> Result<T, Error> {
    let result = match std::mem::replace(slot, Ok(taken)) {
        Ok(state) => step(state),
        Err(e) => Err(e),
    };
    match result {
        Ok((next, out)) => {
            *slot = Ok(next);
            Ok(out)
        }
        Err(e) => {
            *slot = Err(e.clone());
            Err(e)
        }
    }
}
