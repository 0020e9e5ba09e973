//! The agent's TPM and verifier: opened from configuration, measured at start.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use trustmig_attest::tpm::{TpmAttester, TpmConfig};
use trustmig_attest::{Policy, PolicyVerifier};
use trustmig_protocol::attestation::{AttestationError, Attester, Measurement};
use trustmig_protocol::Digest;

use crate::config::Config;
use crate::error::AgentError;

/// The agent's TPM as the protocol's state machines use it, for one step: the lock is taken at
/// the step's first `extend` or `quote` and held to the step's end, so what a step extends is
/// what it quotes (another migration's extend between the two would make the quote's last
/// `image-manifest` or `migration-final` event another one: SPEC.md §5.2 D8, §8.7). A step that
/// asks nothing of the TPM (the source's final evidence, unless the order is strict: §8.7)
/// takes no lock, so it never waits for another migration's quote or the audit anchor's extend.
/// Waiting for the lock and the TPM happens where the runtime lets a task block
/// (`block_in_place`), so a quote taking a hardware TPM's 100–600 ms does not hold up the
/// runtime's other tasks (other migrations' pumps and switch-overs). Made per step, dropped
/// with it; never kept across an `.await` (its guard cannot be).
pub struct SharedTpm<'a, A> {
    tpm: &'a Mutex<A>,
    held: Option<MutexGuard<'a, A>>,
}

impl<'a, A> SharedTpm<'a, A> {
    /// The TPM behind `tpm`, not locked yet.
    pub fn new(tpm: &'a Mutex<A>) -> Self {
        Self { tpm, held: None }
    }

    fn locked<T>(&mut self, f: impl FnOnce(&mut A) -> T) -> T {
        tokio::task::block_in_place(|| {
            let tpm = self.tpm;
            let held = self
                .held
                .get_or_insert_with(|| tpm.lock().expect("attester lock"));
            f(held)
        })
    }
}

impl<A: Attester> Attester for SharedTpm<'_, A> {
    fn extend(&mut self, m: &Measurement) -> Result<(), AttestationError> {
        self.locked(|tpm| tpm.extend(m))
    }

    fn quote(&mut self, qualifying_data: &Digest) -> Result<Vec<u8>, AttestationError> {
        self.locked(|tpm| tpm.quote(qualifying_data))
    }
}

/// A quote taken ahead of the handshake step that sends it (the destination's, SPEC.md §5.2
/// D11): handed over when the step asks for exactly that qualifying data, once; any other
/// request goes to the TPM.
pub struct Prequoted<'a, A> {
    /// What the early quote covers, and its outcome (a failed quote fails the step that asks
    /// for it, as it would have then); none: every request goes to the TPM.
    pub early: Option<(Digest, Result<Vec<u8>, AttestationError>)>,
    /// The TPM, for anything else.
    pub tpm: SharedTpm<'a, A>,
}

impl<A: Attester> Attester for Prequoted<'_, A> {
    fn extend(&mut self, m: &Measurement) -> Result<(), AttestationError> {
        self.tpm.extend(m)
    }

    fn quote(&mut self, qualifying_data: &Digest) -> Result<Vec<u8>, AttestationError> {
        match self.early.take() {
            Some((covers, quote)) if &covers == qualifying_data => quote,
            _ => self.tpm.quote(qualifying_data),
        }
    }
}

/// SHA-256 of a file, streamed.
pub fn file_sha256(path: &Path) -> Result<[u8; 32], AgentError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(AgentError::io(path))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(AgentError::io(path))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

/// SHA-256 of the running agent executable: what peers' policies allow.
pub fn self_measurement() -> Result<[u8; 32], AgentError> {
    let exe = std::env::current_exe().map_err(AgentError::io("/proc/self/exe"))?;
    file_sha256(&exe)
}

/// Open the TPM, reset the measurement PCR, and measure this agent's executable and
/// configuration into it (spec: SPEC.md §6.2). Returns the attester.
pub fn open_measured(config: &Config, config_path: &Path) -> Result<TpmAttester, AgentError> {
    let tpm_cfg = TpmConfig {
        tcti: config.tpm.tcti.clone(),
        ak_handle: config.tpm.ak_handle,
        pcr: config.tpm.pcr,
    };
    let mut att = TpmAttester::open(tpm_cfg)
        .map_err(|e| AgentError::Tpm(format!("{e} (tcti {})", config.tpm.tcti)))?;
    att.measure(&Measurement::AgentExecutable(self_measurement()?))
        .map_err(|e| AgentError::Tpm(e.to_string()))?;
    att.measure(&Measurement::AgentConfig(file_sha256(config_path)?))
        .map_err(|e| AgentError::Tpm(e.to_string()))?;
    Ok(att)
}

/// Load the attestation policy of a home.
pub fn load_verifier(policy_path: &Path) -> Result<PolicyVerifier, AgentError> {
    let policy = Policy::from_file(policy_path).map_err(|e| AgentError::BadConfig {
        path: policy_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(PolicyVerifier::new(policy))
}

/// The agent's TPM as its tasks share it: quotes timed into the metrics.
pub type AgentTpm = crate::metrics::TimedAttester<TpmAttester>;

/// The audit trail's anchor: a PCR of the agent's own TPM (`tpm.audit_pcr`).
pub struct PcrAnchor {
    /// The TPM, shared with the migrations.
    pub tpm: std::sync::Arc<std::sync::Mutex<AgentTpm>>,
    /// The PCR.
    pub pcr: u8,
}

impl crate::audit::Anchor for PcrAnchor {
    fn pcr(&self) -> u8 {
        self.pcr
    }

    fn read(&mut self) -> Result<[u8; 32], String> {
        let mut tpm = self.tpm.lock().expect("attester lock");
        (tpm.inner().tpm().pcr_read_at(self.pcr)).map_err(|e| e.to_string())
    }

    fn extend(&mut self, digest: &[u8; 32]) -> Result<(), String> {
        let mut tpm = self.tpm.lock().expect("attester lock");
        (tpm.inner().tpm().pcr_extend_at(self.pcr, digest)).map_err(|e| e.to_string())
    }
}

/// The audit anchor as the operator's `audit` commands reach it, with no agent running: the
/// home's TPM, for PCRs alone (no key loaded or created).
pub struct OperatorAnchor {
    pcrs: trustmig_attest::tpm::Pcrs,
    pcr: u8,
}

impl OperatorAnchor {
    /// Open the TPM the home's configuration names.
    pub fn open(home: &crate::home::Home) -> Result<Self, AgentError> {
        let config = Config::load(&home.config())?;
        let pcrs = trustmig_attest::tpm::Pcrs::open(&config.tpm.tcti)
            .map_err(|e| AgentError::Tpm(format!("{e} (tcti {})", config.tpm.tcti)))?;
        Ok(Self {
            pcrs,
            pcr: config.tpm.audit_pcr,
        })
    }
}

impl crate::audit::Anchor for OperatorAnchor {
    fn pcr(&self) -> u8 {
        self.pcr
    }

    fn read(&mut self) -> Result<[u8; 32], String> {
        self.pcrs.read(self.pcr).map_err(|e| e.to_string())
    }

    fn extend(&mut self, digest: &[u8; 32]) -> Result<(), String> {
        self.pcrs
            .extend(self.pcr, digest)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TPM that quotes its log's last event; each extend takes a while, as a hardware TPM's
    /// does.
    #[derive(Default)]
    struct Logging(Vec<Measurement>);

    impl Attester for Logging {
        fn extend(&mut self, m: &Measurement) -> Result<(), AttestationError> {
            self.0.push(m.clone());
            std::thread::sleep(std::time::Duration::from_millis(2));
            Ok(())
        }
        fn quote(&mut self, _: &Digest) -> Result<Vec<u8>, AttestationError> {
            Ok(format!("{:?}", self.0.last()).into_bytes())
        }
    }

    /// What a step extends is what it quotes, however many steps share the TPM (the source
    /// extends its manifest root and quotes, and the peer checks the quote's last one: SPEC.md
    /// §5.2 D8): the lock a step takes is held to its end.
    #[test]
    fn a_step_quotes_what_it_extended() {
        let tpm = Mutex::new(Logging::default());
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let tpm = &tpm;
                s.spawn(move || {
                    for _ in 0..5 {
                        let mut step = SharedTpm::new(tpm);
                        let mine = Measurement::ImageManifest([i; 32]);
                        step.extend(&mine).unwrap();
                        let quoted = step.quote(&[0; 32]).unwrap();
                        let want = format!("{:?}", Some(&mine)).into_bytes();
                        assert_eq!(quoted, want, "step {i}");
                    }
                });
            }
        });
    }
}
