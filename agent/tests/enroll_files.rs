//! Enrollment across hosts with the four file-carrying commands, as an operator would run them
//! on two machines (here: two homes, two swtpm TPMs manufactured by one local EK CA).

use std::process::Command;

use trustmig_attest::swtpm::{LocalCa, Swtpm};
use trustmig_attest::Policy;

fn trustmig(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trustmig"))
        .args(args)
        .output()
        .expect("run trustmig");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn ok(args: &[&str]) -> String {
    let (ok, out) = trustmig(args);
    assert!(ok, "{args:?}: {out}");
    out
}

#[test]
fn four_step_enrollment_trusts_the_ak_and_refuses_a_wrong_response() {
    let ca = match LocalCa::new() {
        Ok(ca) => ca,
        Err(e) => panic!("local CA: {e}"),
    };
    let (a_tpm, b_tpm) = match (
        Swtpm::start_manufactured(&ca),
        Swtpm::start_manufactured(&ca),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "swtpm is required in CI: {e}"
            );
            eprintln!("skipped: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
    let a_id = ok(&["init", "--home", a_s, "--tcti", &a_tpm.tcti()])
        .lines()
        .next()
        .unwrap()
        .to_string();
    ok(&["init", "--home", b_s, "--tcti", &b_tpm.tcti()]);
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, ca.certificates_pem().unwrap()).unwrap();
    let f = |n: &str| dir.path().join(n).to_str().unwrap().to_string();

    // Host A, then host B, then A, then B: only files travel between them.
    ok(&[
        "attest",
        "enroll-request",
        "--home",
        a_s,
        "--out",
        &f("req"),
    ]);
    ok(&[
        "attest",
        "enroll-challenge",
        "--home",
        b_s,
        "--request",
        &f("req"),
        "--ek-ca",
        ca_pem.to_str().unwrap(),
        "--ek-unchecked",
        "--out",
        &f("chal"),
    ]);
    ok(&[
        "attest",
        "enroll-activate",
        "--home",
        a_s,
        "--challenge",
        &f("chal"),
        "--out",
        &f("resp"),
    ]);
    let out = ok(&[
        "attest",
        "enroll-finish",
        "--home",
        b_s,
        "--response",
        &f("resp"),
        "--agent",
        &a_id,
    ]);
    assert!(out.contains("enrolled AK"), "{out}");
    let policy = Policy::from_file(&b.join("trust/policy.toml")).unwrap();
    assert_eq!(hex::encode(policy.trusted_aks[0].agent), a_id);
    assert!(
        !b.join(format!("trust/pending/{a_id}.cbor")).exists(),
        "pending secret removed"
    );

    // A response that is not the activated secret is refused, and the pending secret is gone.
    ok(&[
        "attest",
        "enroll-challenge",
        "--home",
        b_s,
        "--request",
        &f("req"),
        "--ek-ca",
        ca_pem.to_str().unwrap(),
        "--ek-unchecked",
        "--out",
        &f("chal2"),
    ]);
    let forged = trustmig_attest::EnrollResponse {
        secret: vec![0; 32],
    };
    std::fs::write(f("forged"), forged.to_cbor()).unwrap();
    let (good, out) = trustmig(&[
        "attest",
        "enroll-finish",
        "--home",
        b_s,
        "--response",
        &f("forged"),
        "--agent",
        &a_id,
    ]);
    assert!(
        !good && out.contains("the AK does not live in the TPM of the certified EK"),
        "{out}"
    );
    let (good, out) = trustmig(&[
        "attest",
        "enroll-finish",
        "--home",
        b_s,
        "--response",
        &f("resp"),
        "--agent",
        &a_id,
    ]);
    assert!(
        !good && out.contains("pending"),
        "no second try with the same challenge: {out}"
    );
    // An EK certificate from another CA is refused at the challenge.
    let other = LocalCa::new().unwrap();
    let c_tpm = Swtpm::start_manufactured(&other).unwrap();
    std::fs::write(&ca_pem, other.certificates_pem().unwrap()).unwrap();
    let _ = c_tpm;
    let (good, out) = trustmig(&[
        "attest",
        "enroll-challenge",
        "--home",
        b_s,
        "--request",
        &f("req"),
        "--ek-ca",
        ca_pem.to_str().unwrap(),
        "--ek-unchecked",
        "--out",
        &f("chal3"),
    ]);
    assert!(
        !good
            && out.contains("enrollment refused")
            && out.contains("does not chain to a trusted CA"),
        "{out}"
    );
}

/// A request swapped on its way for one from another machine whose TPM chains to the same
/// trusted vendor CA passes every check of the certificate; the EK fingerprint that
/// `enroll-request` printed on the agent's host, given to `enroll-challenge`, refuses it.
#[test]
fn a_request_from_another_tpm_is_refused_by_the_ek_fingerprint() {
    let ca = LocalCa::new().expect("local CA");
    let Some(tpms) = (0..3)
        .map(|_| trustmig_attest::swtpm::or_skip(Swtpm::start_manufactured(&ca)))
        .collect::<Option<Vec<Swtpm>>>()
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let f = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    for (name, tpm) in ["a", "b", "rogue"].iter().zip(&tpms) {
        ok(&["init", "--home", &f(name), "--tcti", &tpm.tcti()]);
    }
    std::fs::write(f("ca.pem"), ca.certificates_pem().unwrap()).unwrap();
    let printed = ok(&[
        "attest",
        "enroll-request",
        "--home",
        &f("a"),
        "--out",
        &f("a.req"),
    ]);
    let fingerprint = printed
        .lines()
        .find_map(|l| l.strip_prefix("EK certificate SHA-256: "))
        .unwrap_or_else(|| panic!("no fingerprint printed: {printed}"))
        .to_string();
    ok(&[
        "attest",
        "enroll-request",
        "--home",
        &f("rogue"),
        "--out",
        &f("rogue.req"),
    ]);
    // `--ek-sha256` as given (`given`), for `request`.
    let challenge_with = |given: &str, request: &str, out: &str| {
        trustmig(&[
            "attest",
            "enroll-challenge",
            "--home",
            &f("b"),
            "--request",
            &f(request),
            "--ek-ca",
            &f("ca.pem"),
            "--ek-sha256",
            given,
            "--out",
            &f(out),
        ])
    };
    let challenge = |request: &str, out: &str| challenge_with(&fingerprint, request, out);
    let (good, out) = challenge("rogue.req", "rogue.chal");
    assert!(
        !good
            && out.contains("not from the TPM of the host you meant")
            && out.contains(&fingerprint),
        "{out}"
    );
    assert!(
        !dir.path().join("rogue.chal").exists(),
        "no challenge written"
    );
    // Neither a fingerprint nor `--ek-unchecked`: refused before anything is read.
    let (good, out) = trustmig(&[
        "attest",
        "enroll-challenge",
        "--home",
        &f("b"),
        "--request",
        &f("a.req"),
        "--ek-ca",
        &f("ca.pem"),
        "--out",
        &f("none.chal"),
    ]);
    assert!(
        !good && out.contains("--ek-sha256") && out.contains("--ek-unchecked"),
        "{out}"
    );
    let (good, out) = challenge("a.req", "a.chal");
    assert!(
        good && out.contains(&format!("{fingerprint} (as given)")),
        "{out}"
    );
    // The same fingerprint as openssl prints one (upper case, colons) is the same check.
    let colons = (fingerprint.as_bytes().chunks(2))
        .map(|p| std::str::from_utf8(p).unwrap().to_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    let with_colons = |request: &str, out: &str| challenge_with(&colons, request, out);
    let (good, out) = with_colons("rogue.req", "rogue2.chal");
    assert!(
        !good && out.contains("not from the TPM of the host you meant"),
        "{out}"
    );
    let (good, out) = with_colons("a.req", "a2.chal");
    assert!(
        good && out.contains(&format!("{fingerprint} (as given)")),
        "{out}"
    );
    // A fingerprint that is not 32 bytes of hex is named as such.
    let (good, out) = challenge_with("abc", "a.req", "x.chal");
    assert!(
        !good && out.contains("--ek-sha256") && out.contains("EK certificate SHA-256"),
        "{out}"
    );
}
