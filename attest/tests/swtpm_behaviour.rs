//! What SPEC.md §8.10 says of a TPM's own behaviour, pinned against swtpm: PCR 23, the default
//! audit PCR, can be reset at locality 0, so the anchor holds only against someone who cannot
//! reset it.

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
