//! Shared test helpers: a measured agent on its own swtpm and a verifier that trusts it.
#![allow(dead_code)]

use trustmig_attest::policy::{EventKind, Policy, TrustedAk};
use trustmig_attest::swtpm::{or_skip, Swtpm};
use trustmig_attest::tpm::{TpmAttester, TpmConfig};
use trustmig_attest::PolicyVerifier;
use trustmig_protocol::attestation::{qualifying_data, Measurement, HANDSHAKE_LABEL};
use trustmig_protocol::{AgentId, Digest};

pub const EXE: Digest = [0x11; 32];
pub const CONFIG: Digest = [0x22; 32];
pub const MANIFEST: Digest = [0x33; 32];
pub const AGENT: AgentId = [0xa7; 32];
pub const OTHER_AGENT: AgentId = [0xb8; 32];

pub struct Agent {
    pub att: TpmAttester,
    pub tpm: Swtpm,
}

/// A started swtpm with a measured agent (executable, config, manifest), or None to skip.
pub fn agent() -> Option<Agent> {
    let tpm = or_skip(Swtpm::start())?;
    let mut att = TpmAttester::open(TpmConfig::new(tpm.tcti())).expect("open TPM");
    att.measure(&Measurement::AgentExecutable(EXE))
        .expect("extend exe");
    att.measure(&Measurement::AgentConfig(CONFIG))
        .expect("extend config");
    att.measure(&Measurement::ImageManifest(MANIFEST))
        .expect("extend manifest");
    Some(Agent { att, tpm })
}

pub fn policy_for(att: &mut TpmAttester, agent: AgentId) -> Policy {
    Policy {
        pcr: 16,
        trusted_aks: vec![TrustedAk {
            agent,
            ak_name: att.tpm().ak_public().name(),
        }],
        allowed_executables: vec![EXE],
        allowed_configs: Some(vec![CONFIG]),
        required_events: vec![EventKind::AgentExecutable, EventKind::AgentConfig],
    }
}

pub fn verifier_for(att: &mut TpmAttester) -> PolicyVerifier {
    PolicyVerifier::new(policy_for(att, AGENT))
}

/// Handshake qualifying data for a nonce/exporter/order as the quoting agent `AGENT`.
pub fn qd(nonce: u8, exporter: u8) -> Digest {
    qualifying_data(
        HANDSHAKE_LABEL,
        &[nonce; 32],
        &[exporter; 32],
        &[9; 16],
        &AGENT,
    )
}
