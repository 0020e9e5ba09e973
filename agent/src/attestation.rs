//! The agent's TPM and verifier: opened from configuration, measured at start.

use std::path::Path;
use std::sync::Mutex;

use trustmig_attest::tpm::{TpmAttester, TpmConfig};
use trustmig_attest::{Policy, PolicyVerifier};
use trustmig_protocol::attestation::{AttestationError, Attester, Measurement};
use trustmig_protocol::Digest;

use crate::config::Config;
use crate::error::AgentError;

/// The agent's TPM as the protocol's state machines use it: every `extend` and `quote` takes
/// the lock for itself alone, and waits for it and for the TPM where the runtime allows
/// blocking (`block_in_place`). So a step that asks nothing of the TPM (the source's final
/// evidence, unless the order is strict: SPEC.md §8.7) never waits for another migration's
/// quote or the audit anchor's extend, and a quote taking a hardware TPM's 100–600 ms does not
/// hold up the runtime's other tasks (other migrations' pumps and switch-overs).
pub struct SharedTpm<'a, A>(pub &'a Mutex<A>);

impl<A: Attester> Attester for SharedTpm<'_, A> {
    fn extend(&mut self, m: &Measurement) -> Result<(), AttestationError> {
        tokio::task::block_in_place(|| self.0.lock().expect("attester lock").extend(m))
    }

    fn quote(&mut self, qualifying_data: &Digest) -> Result<Vec<u8>, AttestationError> {
        tokio::task::block_in_place(|| self.0.lock().expect("attester lock").quote(qualifying_data))
    }
}

/// A quote taken ahead of the handshake step that sends it (the destination's, SPEC.md §5.2
/// D11): handed over when the step asks for exactly that qualifying data, once; any other
/// request goes to the TPM.
pub struct Prequoted<'a, A> {
    /// What the early quote covers.
    pub qualifying_data: Digest,
    /// Its outcome (a failed quote fails the step that asks for it, as it would have then).
    pub quote: Option<Result<Vec<u8>, AttestationError>>,
    /// The TPM, for anything else.
    pub tpm: SharedTpm<'a, A>,
}

impl<A: Attester> Attester for Prequoted<'_, A> {
    fn extend(&mut self, m: &Measurement) -> Result<(), AttestationError> {
        self.tpm.extend(m)
    }

    fn quote(&mut self, qualifying_data: &Digest) -> Result<Vec<u8>, AttestationError> {
        match self.quote.take() {
            Some(q) if qualifying_data == &self.qualifying_data => q,
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
