//! What SPEC.md §8.10 and attestation.md §1 say of a TPM's own behaviour, pinned against
//! swtpm: PCR 23, the default audit PCR, can be reset at locality 0, so the anchor holds only
//! against someone who cannot reset it; of the measurement PCRs, 16 and 23 reset at locality 0
//! and 17..=22 refuse.

use trustmig_attest::swtpm::{or_skip, Swtpm};
use trustmig_attest::tpm::{Tpm, TpmConfig};

#[test]
fn pcr_23_resets_at_locality_0() {
    let Some(swtpm) = or_skip(Swtpm::start()) else {
        return;
    };
    let mut cfg = TpmConfig::new(swtpm.tcti());
    cfg.pcr = 23;
    let mut tpm = Tpm::open(cfg).expect("open");
    tpm.pcr_extend_at(23, &[7; 32]).expect("extend");
    assert_ne!(tpm.pcr_read_at(23).expect("read"), [0; 32]);
    tpm.pcr_reset().expect("PCR 23 resets at locality 0");
    assert_eq!(tpm.pcr_read_at(23).expect("read"), [0; 32]);
}

/// attestation.md §1: of the measurement PCRs the agent may use, 16 and 23 reset at locality 0
/// and 17..=22 do not: an attester opened on one of those fails at its reset, naming the
/// command and the TPM's locality error.
#[test]
fn only_pcrs_16_and_23_reset_at_locality_0() {
    use trustmig_attest::tpm::{TpmAttester, TpmError};
    let Some(swtpm) = or_skip(Swtpm::start()) else {
        return;
    };
    for pcr in 16..=23u8 {
        let mut cfg = TpmConfig::new(swtpm.tcti());
        cfg.pcr = pcr;
        match (pcr, TpmAttester::open(cfg)) {
            (16 | 23, Ok(_)) => {}
            (17..=22, Err(TpmError::Command { command, code, .. })) => {
                assert_eq!(command, "TPM2_PCR_Reset", "PCR {pcr}");
                assert!(
                    code.to_lowercase().contains("locality"),
                    "PCR {pcr}: {code}"
                );
            }
            (_, other) => panic!("PCR {pcr}: {:?}", other.err()),
        }
    }
}
