//! Operator commands that work on files: init, trust, orders, enrollment.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use trustmig_attest::enroll::PendingEnrollment;
use trustmig_attest::policy::EventKind;
use trustmig_attest::tpm::{Tpm, TpmConfig};
use trustmig_attest::{
    EnrollChallenge, EnrollRequest, EnrollResponse, Enroller, Policy, TrustedAk,
};
use trustmig_protocol::order::{
    check_limits, hex, Limits, NonConvergence, OrderBody, OrderPolicy, Role, SignedOrder,
    ORDER_VERSION,
};
use trustmig_protocol::AgentId;

use crate::config::{default_config_text, Config};
use crate::error::AgentError;
use crate::home::{read_text, write_atomic, Home};
use crate::identity::{operator_load, parse_hex32, Identity};
use crate::journal::Journal;
use crate::trust::KeyList;
use zeroize::Zeroizing;

/// Create an agent home whose policy allows peers running this very executable.
pub fn init(home: &Home, listen: &str, tcti: &str) -> Result<AgentId, AgentError> {
    init_with(home, listen, tcti, crate::attestation::self_measurement()?)
}

/// Create an agent home whose policy allows peers whose executable measures `allowed_exe`.
pub fn init_with(
    home: &Home,
    listen: &str,
    tcti: &str,
    allowed_exe: [u8; 32],
) -> Result<AgentId, AgentError> {
    let root = home.root();
    if home.identity_key().exists() {
        return Err(AgentError::HomeExists(root.to_path_buf()));
    }
    std::fs::create_dir_all(root).map_err(AgentError::io(root))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
        .map_err(AgentError::io(root))?;
    std::fs::create_dir_all(home.trust_dir()).map_err(AgentError::io(home.trust_dir()))?;
    let id = Identity::create(home)?.id();
    write_atomic(&home.config(), default_config_text(listen, tcti).as_bytes())?;
    KeyList::default().save(&home.peers())?;
    KeyList::default().save(&home.operators())?;
    let cfg = Config::load(&home.config())?;
    let policy = Policy {
        pcr: cfg.tpm.pcr,
        trusted_aks: vec![],
        // Peers running this build are allowed; add others with `trust allow-exe`.
        allowed_executables: vec![allowed_exe],
        allowed_configs: None,
        required_events: vec![EventKind::AgentExecutable, EventKind::AgentConfig],
    };
    write_policy(home, &policy)?;
    Journal::open(&home.journal_dir())?;
    Ok(id)
}

fn write_policy(home: &Home, p: &Policy) -> Result<(), AgentError> {
    let text = format!(
        "# trustmig attestation policy (spec/attestation.md). Quotes from AKs not listed under\n\
         # [[trusted_ak]] are refused: enroll peers with `trustmig attest enroll`.\n{}",
        p.to_toml()
    );
    write_atomic(&home.policy(), text.as_bytes())
}

fn load_policy(home: &Home) -> Result<Policy, AgentError> {
    Policy::from_file(&home.policy()).map_err(|e| AgentError::BadConfig {
        path: home.policy(),
        reason: e.to_string(),
    })
}

/// Allow a peer agent executable digest in the policy.
pub fn allow_exe(home: &Home, digest: [u8; 32]) -> Result<(), AgentError> {
    let mut p = load_policy(home)?;
    if !p.allowed_executables.contains(&digest) {
        p.allowed_executables.push(digest);
    }
    write_policy(home, &p)
}

/// Remove the enrolled AK(s) of the agent named `name_or_key` (a peer's name in the trust
/// store, or its hex identity) from the attestation policy. The running agent reads the
/// policy at start and at a reload.
pub fn remove_ak(home: &Home, name_or_key: &str) -> Result<usize, AgentError> {
    let peers = KeyList::load(&home.peers())?;
    let agent = match peers.entries().find(|e| e.name == name_or_key) {
        Some(e) => parse_hex32(&e.key, "peer identity", &home.peers())?,
        None => key_arg(name_or_key)?,
    };
    let mut p = load_policy(home)?;
    let n = p.untrust(&agent);
    if n == 0 {
        return Err(AgentError::Usage(format!(
            "no AK is enrolled for {name_or_key:?} in {}",
            home.policy().display()
        )));
    }
    write_policy(home, &p)?;
    Ok(n)
}

/// Read a hex public key given directly or as a file holding it.
pub fn key_arg(arg: &str) -> Result<[u8; 32], AgentError> {
    let p = Path::new(arg);
    if p.exists() {
        let t = read_text(p)?;
        let key = Zeroizing::new(parse_hex32(&t, "ed25519 public key", p)?);
        if crate::identity::is_secret_beside_its_public(p, &key) {
            return Err(AgentError::BadKey {
                path: p.to_path_buf(),
                kind: "ed25519 public key",
                reason: format!(
                    "this is the secret key of {}; pass that public key instead",
                    p.with_extension("pub").display()
                ),
            });
        }
        return Ok(*key);
    }
    parse_hex32(
        arg,
        "ed25519 public key (hex or a file)",
        Path::new("<argument>"),
    )
}

/// Add a peer identity.
pub fn add_peer(home: &Home, name: &str, key: [u8; 32]) -> Result<(), AgentError> {
    let mut l = KeyList::load(&home.peers())?;
    l.add(name, key);
    l.save(&home.peers())
}

/// Add an operator key.
pub fn add_operator(home: &Home, name: &str, key: [u8; 32]) -> Result<(), AgentError> {
    let mut l = KeyList::load(&home.operators())?;
    l.add(name, key);
    l.save(&home.operators())
}

/// Remove from a key list; error if nothing matched.
pub fn remove_key(path: &Path, name_or_key: &str) -> Result<(), AgentError> {
    let mut l = KeyList::load(path)?;
    if !l.remove(name_or_key) {
        return Err(AgentError::Usage(format!(
            "no entry {name_or_key:?} in {}",
            path.display()
        )));
    }
    l.save(path)
}

/// What `order sign` needs.
pub struct OrderArgs {
    /// VM name.
    pub vm: String,
    /// Source identity.
    pub source: AgentId,
    /// Destination identity.
    pub destination: AgentId,
    /// Destination address.
    pub destination_addr: String,
    /// Limits.
    pub limits: Limits,
    /// Validity in seconds from now.
    pub ttl_secs: u64,
    /// The source's TPM quotes the final digest before `Commit` (SPEC.md §8.7).
    pub strict_final_quote: bool,
}

/// Sign an order with the operator key at `key_path`.
pub fn sign_order(key_path: &Path, a: OrderArgs) -> Result<SignedOrder, AgentError> {
    let key = operator_load(key_path)?;
    check_limits(&a.limits)?;
    let now = crate::unix_now();
    let body = OrderBody {
        v: ORDER_VERSION,
        order_id: crate::random(),
        vm: a.vm,
        source: a.source,
        destination: a.destination,
        destination_addr: a.destination_addr,
        limits: a.limits,
        // Valid from 5 s ago (clock skew between operator and agents) for exactly `ttl_secs`,
        // so any ttl the CLI accepts (1..=MAX_ORDER_LIFETIME) yields a window agents accept.
        not_before: now.saturating_sub(5),
        not_after: now.saturating_sub(5) + a.ttl_secs,
        strict_final_quote: a.strict_final_quote,
    };
    Ok(SignedOrder::sign(&body, &key))
}

/// Human-readable description of an order, verified against `home`'s trust if given.
pub fn show_order(bytes: &[u8], home: Option<&Home>) -> Result<String, AgentError> {
    let signed = SignedOrder::from_cbor(bytes)?;
    let body = signed.dangerous_unverified_body()?;
    let mut out = format!(
        "order      {}\nvm         {}\nsource     {}\ndestination {} at {}\ndowntime   {} ms target\nbandwidth  {}\nmax rounds {}\non non-convergence: {:?}\nvalid      {} .. {} (UNIX)\noperator   {}\n",
        hex(&body.order_id),
        body.vm,
        hex(&body.source),
        hex(&body.destination),
        body.destination_addr,
        body.limits.downtime_ms,
        if body.limits.bandwidth_bps == 0 { "uncapped".to_string() } else { format!("{} bytes/s", body.limits.bandwidth_bps) },
        body.limits.max_rounds,
        body.limits.on_nonconvergence,
        body.not_before,
        body.not_after,
        hex(&signed.operator),
    );
    out += if body.strict_final_quote {
        "final quote strict: the source's TPM quotes the final digest before Commit\n"
    } else {
        "final quote after Resumed (the final digest is signed by the attested session key)\n"
    };
    if let Some(home) = home {
        let ops = KeyList::load(&home.operators())?.keys();
        let me = Identity::load(home)?.id();
        let role = if me == body.destination {
            Role::Destination
        } else {
            Role::Source
        };
        // At the journal's order clock, as the agent would check it; at this host's clock
        // when the journal cannot be read here (said so).
        let (now, overruled) = match crate::journal::look(&home.journal_dir(), crate::unix_now()) {
            Ok(look) => look.order_time,
            Err(e) => {
                out += &format!("journal    not read ({e}): checked against this host's clock\n");
                (crate::unix_now(), None)
            }
        };
        signed
            .verify(&OrderPolicy {
                operators: &ops,
                me,
                role,
                now,
            })
            .map_err(|e| AgentError::of_order(e, overruled))?;
        out += &format!("verified   yes, for this agent as {role}\n");
    } else {
        out += "verified   not checked (give --home to verify against an agent's trust store)\n";
    }
    Ok(out)
}

/// Parse `--on-nonconvergence`.
pub fn parse_action(s: &str) -> Result<NonConvergence, AgentError> {
    s.parse().map_err(AgentError::Usage)
}

fn tpm_of(home: &Home) -> Result<Tpm, AgentError> {
    let cfg = Config::load(&home.config())?;
    Tpm::open(TpmConfig {
        tcti: cfg.tpm.tcti.clone(),
        ak_handle: cfg.tpm.ak_handle,
        pcr: cfg.tpm.pcr,
    })
    .map_err(|e| AgentError::Tpm(format!("{e} (tcti {})", cfg.tpm.tcti)))
}

/// Enrollment step 1 (agent): the request naming this agent, its EK certificate and its AK.
pub fn enroll_request(agent_home: &Home) -> Result<EnrollRequest, AgentError> {
    let agent_id = Identity::load(agent_home)?.id();
    tpm_of(agent_home)?
        .enroll_request(agent_id)
        .map_err(|e| AgentError::Tpm(e.to_string()))
}

/// Enrollment step 2 (verifier): check the EK certificate against `ek_ca_pem` and wrap a fresh
/// secret to the EK, bound to the AK's name (MakeCredential on the verifier's TPM).
pub fn enroll_challenge(
    verifier_home: &Home,
    req: &EnrollRequest,
    ek_ca_pem: &str,
) -> Result<(EnrollChallenge, PendingEnrollment), AgentError> {
    let enroller =
        Enroller::from_pem(ek_ca_pem).map_err(|e| AgentError::Tpm(format!("EK CA: {e}")))?;
    let mut verifier_tpm = tpm_of(verifier_home)?;
    enroller
        .challenge(req, &mut verifier_tpm, crate::unix_now() as i64)
        .map_err(|e| AgentError::Tpm(format!("enrollment refused: {e}")))
}

/// Enrollment step 3 (agent): ActivateCredential succeeds only in the TPM holding both the EK
/// and the AK.
pub fn enroll_activate(
    agent_home: &Home,
    ch: &EnrollChallenge,
) -> Result<EnrollResponse, AgentError> {
    tpm_of(agent_home)?
        .activate_credential(ch)
        .map_err(|e| AgentError::Tpm(e.to_string()))
}

/// Enrollment step 4 (verifier): compare the secret and trust the AK in the policy.
pub fn enroll_finish(
    verifier_home: &Home,
    pending: PendingEnrollment,
    resp: &EnrollResponse,
) -> Result<TrustedAk, AgentError> {
    let entry = pending
        .finish(resp)
        .map_err(|e| AgentError::Tpm(format!("enrollment refused: {e}")))?;
    let mut policy = load_policy(verifier_home)?;
    policy
        .trust(entry.clone())
        .map_err(|e| AgentError::BadConfig {
            path: verifier_home.policy(),
            reason: e.to_string(),
        })?;
    write_policy(verifier_home, &policy)?;
    Ok(entry)
}

/// Where a verifier keeps a pending enrollment for `agent` between steps 2 and 4.
pub fn pending_path(verifier_home: &Home, agent: &AgentId) -> std::path::PathBuf {
    verifier_home
        .trust_dir()
        .join("pending")
        .join(format!("{}.cbor", hex::encode(agent)))
}

/// All four steps at once, when both homes and TPMs are reachable from here (one host, or the
/// demo). Across hosts, run the steps with `trustmig attest enroll-request|challenge|activate|
/// finish` and carry the files between them.
pub fn enroll(
    agent_home: &Home,
    verifier_home: &Home,
    ek_ca_pem: &str,
) -> Result<TrustedAk, AgentError> {
    let req = enroll_request(agent_home)?;
    let (challenge, pending) = enroll_challenge(verifier_home, &req, ek_ca_pem)?;
    let response = enroll_activate(agent_home, &challenge)?;
    enroll_finish(verifier_home, pending, &response)
}

/// Parse a CBOR file of one of the enrollment messages, naming the file on error. Its bytes
/// are wiped once parsed (the response carries the activated credential).
fn read_cbor<T>(
    path: &Path,
    parse: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<T, AgentError> {
    let bytes = zeroize::Zeroizing::new(crate::home::read_limited(
        path,
        crate::home::MAX_MESSAGE_FILE,
    )?);
    parse(&bytes).map_err(|reason| AgentError::BadConfig {
        path: path.to_path_buf(),
        reason,
    })
}

/// The SHA-256 of a request's EK certificate, hex: what the operator compares between the
/// agent's host and the verifier's. The certificate chains to a TPM vendor, not to this host:
/// a request swapped on its way for one from another machine with a genuine TPM would enroll
/// that machine's AK for this agent, unless the operator checks the EK is this host's.
pub fn ek_fingerprint(req: &EnrollRequest) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &req.ek_cert))
}

/// Enrollment by files, step 1 on the agent's host: write its request to `out`; returns it
/// (its EK fingerprint is for the operator to carry to the verifier's host).
pub fn enroll_request_file(agent_home: &Home, out: &Path) -> Result<EnrollRequest, AgentError> {
    let req = enroll_request(agent_home)?;
    crate::home::write_atomic(out, &req.to_cbor())?;
    Ok(req)
}

/// Step 2 on the verifier's host: check the request against the EK CA in `ek_ca` and, when
/// given, its EK certificate against the fingerprint `ek_sha256` the agent's host printed;
/// keep the pending secret in the trust store (0600; a newer challenge replaces an older one),
/// and write the challenge to `out`. Returns the request.
pub fn enroll_challenge_files(
    verifier_home: &Home,
    request: &Path,
    ek_ca: &Path,
    ek_sha256: Option<&str>,
    out: &Path,
) -> Result<EnrollRequest, AgentError> {
    let req = read_cbor(request, |b| {
        EnrollRequest::from_cbor(b).map_err(|e| e.to_string())
    })?;
    if let Some(want) = ek_sha256 {
        // As `enroll-request` prints it, or as `openssl x509 -fingerprint -sha256` does.
        let want: String = want.chars().filter(|c| *c != ':').collect();
        let want = hex::encode(crate::identity::parse_hex32(
            &want,
            "EK certificate SHA-256",
            Path::new("--ek-sha256"),
        )?);
        let got = ek_fingerprint(&req);
        if got != want {
            return Err(AgentError::BadConfig {
                path: request.to_path_buf(),
                reason: format!("its EK certificate's SHA-256 is {got}, not {want} (--ek-sha256): this request is not from the TPM of the host you meant; do not enroll it (was it swapped on its way?)"),
            });
        }
    }
    let pem = crate::home::read_text(ek_ca)?;
    let (challenge, pending) = enroll_challenge(verifier_home, &req, &pem)?;
    let p = pending_path(verifier_home, &req.agent);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).map_err(AgentError::io(dir))?;
    }
    let _ = std::fs::remove_file(&p);
    crate::home::write_secret(&p, &pending.dangerous_to_cbor())?;
    crate::home::write_atomic(out, &challenge.to_cbor())?;
    Ok(req)
}

/// Step 3 on the agent's host: its TPM unwraps the challenge; the response goes to `out`
/// (0600).
pub fn enroll_activate_files(
    agent_home: &Home,
    challenge: &Path,
    out: &Path,
) -> Result<(), AgentError> {
    let ch = read_cbor(challenge, |b| {
        EnrollChallenge::from_cbor(b).map_err(|e| e.to_string())
    })?;
    let resp = enroll_activate(agent_home, &ch)?;
    crate::home::write_secret(out, &resp.to_cbor())
}

/// Step 4 on the verifier's host: check the response against the pending secret for `agent`
/// and trust its AK. The pending secret is single use: it is removed whether or not the
/// response was right, so a failed activation cannot be retried against the same secret.
pub fn enroll_finish_files(
    verifier_home: &Home,
    response: &Path,
    agent: &AgentId,
) -> Result<TrustedAk, AgentError> {
    let p = pending_path(verifier_home, agent);
    let pending_bytes = crate::home::read_secret(&p)?;
    let pending =
        PendingEnrollment::from_cbor(&pending_bytes).map_err(|e| AgentError::BadConfig {
            path: p.clone(),
            reason: e.to_string(),
        })?;
    let resp = read_cbor(response, |b| {
        EnrollResponse::from_cbor(b).map_err(|e| e.to_string())
    })?;
    let _ = std::fs::remove_file(&p);
    enroll_finish(verifier_home, pending, &resp)
}

/// The audit anchor PCR and its value: from the running agent, which knows the PCR it anchors
/// in whatever the configuration file says now, else from the TPM (`audit verify`, `doctor`).
pub async fn audit_anchor_value(home: &Home) -> Result<(u8, [u8; 32]), AgentError> {
    use crate::audit::Anchor;
    use crate::control::{Reply, Request};
    if let Ok(reply) = crate::control::request(&home.control_socket(), &Request::AuditAnchor).await
    {
        return match reply {
            Reply::Anchor { pcr, value } => hex::decode(&value)
                .ok()
                .and_then(|v| v.try_into().ok())
                .map(|v| (pcr, v))
                .ok_or_else(|| {
                    AgentError::Migration(format!(
                        "the agent sent a PCR value that is not one: {value:?}"
                    ))
                }),
            Reply::Error(e) => Err(AgentError::Usage(format!("the agent refused: {e}"))),
            other => Err(AgentError::Migration(format!(
                "unexpected answer from the agent: {other:?}"
            ))),
        };
    }
    let mut a = crate::attestation::OperatorAnchor::open(home)?;
    let value = a.read().map_err(AgentError::Tpm)?;
    Ok((a.pcr(), value))
}
