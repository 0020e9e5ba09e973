//! TPM access through tss-esapi (feature `tpm`): configuration, the persistent AK, PCR
//! measurement, quotes, and the agent side of enrollment. spec: attestation.md §1, §7.3

use std::str::FromStr;

use trustmig_protocol::attestation::{AttestationError, Attester, Measurement};
use trustmig_protocol::{AgentId, Digest};
use tss_esapi::abstraction::ek;
use tss_esapi::abstraction::AsymmetricAlgorithmSelection;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PcrHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Data, Digest as TpmDigest, DigestValues, EccPoint, EccScheme, EncryptedSecret,
    HashScheme, IdObject, KeyDerivationFunctionScheme, Name, Nonce, PcrSelectionListBuilder,
    PcrSlot, Public, PublicBuilder, PublicEccParametersBuilder, Signature, SignatureScheme,
    SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;
use zeroize::Zeroizing;

use crate::enroll::{CredentialMaker, EnrollChallenge, EnrollRequest, EnrollResponse};
use crate::event_log::{replay, MAX_EVENTS};
use crate::evidence::{EcdsaSignature, Evidence};
use crate::public::{AkPublic, PublicError};

/// Default persistent handle of the AK.
pub const DEFAULT_AK_HANDLE: u32 = 0x8101_0020;
/// Default measurement PCR (resettable at locality 0).
pub const DEFAULT_PCR: u8 = 16;

/// How to reach the TPM and where trustmig keeps its state in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpmConfig {
    /// TCTI: `swtpm:host=127.0.0.1,port=P`, `device:/dev/tpmrm0` or `tabrmd` (`tabrmd:...`).
    pub tcti: String,
    /// Persistent handle of the AK (0x81000000..=0x81ffffff).
    pub ak_handle: u32,
    /// Measurement PCR, SHA-256 bank, 16..=23 (must be resettable at the caller's locality).
    pub pcr: u8,
}

impl TpmConfig {
    /// Defaults ([`DEFAULT_AK_HANDLE`], [`DEFAULT_PCR`]) for this TCTI.
    pub fn new(tcti: impl Into<String>) -> Self {
        Self {
            tcti: tcti.into(),
            ak_handle: DEFAULT_AK_HANDLE,
            pcr: DEFAULT_PCR,
        }
    }
}

/// A TPM operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TpmError {
    /// The TCTI string is not one of the supported forms.
    #[error("bad TCTI {0:?}: expected swtpm:host=H,port=P, device:/dev/tpmrm0 or tabrmd")]
    BadTcti(String),
    /// The PCR is not 16..=23.
    #[error("PCR {0} is not a measurement PCR (16..=23)")]
    BadPcr(u8),
    /// The AK handle is not a persistent handle.
    #[error("AK handle {0:#010x} is not a persistent handle (0x81000000..=0x81ffffff)")]
    BadHandle(u32),
    /// A TPM command failed; `code` is the decoded TPM/TSS return code.
    #[error("{command}{} failed: {code}", handle.map(|h| format!(" on handle {h:#010x}")).unwrap_or_default())]
    Command {
        /// The command (`TPM2_Quote`, `Esys_Initialize`, ...).
        command: &'static str,
        /// The TPM handle involved, if any.
        handle: Option<u32>,
        /// The return code, decoded.
        code: String,
        /// The underlying error.
        #[source]
        source: tss_esapi::Error,
    },
    /// The persistent AK handle holds something that is not a trustmig AK.
    #[error(
        "persistent handle {handle:#010x} holds an object that is not a trustmig AK: {reason}"
    )]
    AkHandleOccupied {
        /// The handle.
        handle: u32,
        /// Why it is not acceptable.
        reason: PublicError,
    },
    /// The TPM returned something trustmig cannot use.
    #[error("TPM returned an unexpected {0}")]
    Unexpected(&'static str),
    /// The PCR no longer replays from our event log: someone else extended it.
    #[error("PCR {pcr} holds {actual} but the event log replays to {expected}: it was extended outside trustmig")]
    PcrDrift {
        /// The PCR.
        pcr: u8,
        /// Value in the TPM (hex).
        actual: String,
        /// Value from our log (hex).
        expected: String,
    },
}

fn tss(command: &'static str, handle: Option<u32>) -> impl FnOnce(tss_esapi::Error) -> TpmError {
    move |source| {
        let code = match &source {
            tss_esapi::Error::Tss2Error(rc) => match raw_rc(rc) {
                Some(raw) => format!("TPM_RC {raw:#010x}: {rc}"),
                None => format!("TPM_RC {rc:?}: {rc}"),
            },
            tss_esapi::Error::WrapperError(w) => format!("tss-esapi: {w}"),
        };
        TpmError::Command {
            command,
            handle,
            code,
            source,
        }
    }
}

/// The raw TSS2_RC. tss-esapi 7.7 exposes it only through `Debug` (`... .0: N ...`).
fn raw_rc(rc: &tss_esapi::constants::response_code::Tss2ResponseCode) -> Option<u32> {
    let d = format!("{rc:?}");
    let i = d.find(".0: ")? + 4;
    d[i..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

const PASSWORD: (
    Option<AuthSession>,
    Option<AuthSession>,
    Option<AuthSession>,
) = (Some(AuthSession::Password), None, None);

fn pcr_handle(pcr: u8) -> Result<PcrHandle, TpmError> {
    PcrHandle::try_from(u32::from(pcr)).map_err(|_| TpmError::BadPcr(pcr))
}

fn pcr_selection(pcr: u8) -> Result<tss_esapi::structures::PcrSelectionList, TpmError> {
    let slot = PcrSlot::try_from(1u32.checked_shl(u32::from(pcr)).unwrap_or(0))
        .map_err(|_| TpmError::BadPcr(pcr))?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &[slot])
        .build()
        .map_err(tss("PCR selection", None))
}

fn extend_pcr(ctx: &mut Context, pcr: u8, digest: &Digest) -> Result<(), TpmError> {
    let handle = pcr_handle(pcr)?;
    let mut values = DigestValues::new();
    values.set(
        HashingAlgorithm::Sha256,
        TpmDigest::try_from(digest.to_vec()).map_err(tss("digest", None))?,
    );
    ctx.execute_with_sessions(PASSWORD, |c| c.pcr_extend(handle, values))
        .map_err(tss("TPM2_PCR_Extend", Some(u32::from(pcr))))
}

fn read_pcr(ctx: &mut Context, pcr: u8) -> Result<Digest, TpmError> {
    let sel = pcr_selection(pcr)?;
    let (_, _, values) = ctx
        .execute_without_session(|c| c.pcr_read(sel))
        .map_err(tss("TPM2_PCR_Read", Some(u32::from(pcr))))?;
    let v = values
        .value()
        .first()
        .ok_or(TpmError::Unexpected("empty PCR read"))?;
    <[u8; 32]>::try_from(v.value()).map_err(|_| TpmError::Unexpected("PCR value size"))
}

/// A TPM opened for PCRs alone, no key loaded or created: the operator's audit commands
/// (`trustmig audit verify | anchor`) while no agent holds the TPM.
pub struct Pcrs {
    ctx: Context,
}

impl Pcrs {
    /// Connect through `tcti`.
    pub fn open(tcti: &str) -> Result<Self, TpmError> {
        let tcti = parse_tcti(tcti)?;
        let ctx = Context::new(tcti).map_err(tss("Esys_Initialize", None))?;
        Ok(Self { ctx })
    }

    /// TPM2_PCR_Read of `pcr`'s SHA-256 value.
    pub fn read(&mut self, pcr: u8) -> Result<Digest, TpmError> {
        read_pcr(&mut self.ctx, pcr)
    }

    /// TPM2_PCR_Extend of `pcr`'s SHA-256 bank.
    pub fn extend(&mut self, pcr: u8, digest: &Digest) -> Result<(), TpmError> {
        extend_pcr(&mut self.ctx, pcr, digest)
    }
}

/// An open TPM with trustmig's AK loaded.
pub struct Tpm {
    ctx: Context,
    cfg: TpmConfig,
    ak: KeyHandle,
    ak_public: AkPublic,
}

/// Parse and check a TCTI configuration string.
pub fn parse_tcti(s: &str) -> Result<TctiNameConf, TpmError> {
    let ok = s.starts_with("swtpm:")
        || s.starts_with("device:")
        || s == "tabrmd"
        || s.starts_with("tabrmd:");
    if !ok {
        return Err(TpmError::BadTcti(s.to_string()));
    }
    TctiNameConf::from_str(s).map_err(|_| TpmError::BadTcti(s.to_string()))
}

fn ak_template() -> Result<Public, tss_esapi::Error> {
    let params = PublicEccParametersBuilder::new()
        .with_symmetric(SymmetricDefinitionObject::Null)
        .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
        .with_curve(EccCurve::NistP256)
        .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
        .with_is_signing_key(true)
        .with_is_decryption_key(false)
        .with_restricted(true)
        .build()?;
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(params)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

impl Tpm {
    /// Connect and look whether the AK's persistent handle holds an object.
    fn connect(cfg: &TpmConfig) -> Result<(Context, bool), TpmError> {
        if !(16..=23).contains(&cfg.pcr) {
            return Err(TpmError::BadPcr(cfg.pcr));
        }
        if !(0x8100_0000..=0x81ff_ffff).contains(&cfg.ak_handle) {
            return Err(TpmError::BadHandle(cfg.ak_handle));
        }
        let tcti = parse_tcti(&cfg.tcti)?;
        let mut ctx = Context::new(tcti).map_err(tss("Esys_Initialize", None))?;
        let h = cfg.ak_handle;
        let ph = PersistentTpmHandle::new(h).map_err(|_| TpmError::BadHandle(h))?;
        // Probe with GetCapability rather than a failing ReadPublic (which the TSS logs).
        let (caps, _) = ctx
            .execute_without_session(|c| c.get_capability(CapabilityType::Handles, h, 1))
            .map_err(tss("TPM2_GetCapability(handles)", Some(h)))?;
        let present = matches!(&caps, CapabilityData::Handles(l)
            if l.first() == Some(&TpmHandle::Persistent(ph)));
        Ok((ctx, present))
    }

    /// Whether the TPM answers and holds an object at the AK's handle; creates nothing
    /// (`trustmig doctor`).
    pub fn probe(cfg: &TpmConfig) -> Result<bool, TpmError> {
        Self::connect(cfg).map(|(_, present)| present)
    }

    /// Connect, then load the AK from its persistent handle, creating and persisting it first
    /// if the handle is empty.
    pub fn open(cfg: TpmConfig) -> Result<Self, TpmError> {
        let (mut ctx, present) = Self::connect(&cfg)?;
        let h = cfg.ak_handle;
        let ph = PersistentTpmHandle::new(h).map_err(|_| TpmError::BadHandle(h))?;
        let obj = if present {
            ctx.execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(ph)))
                .map_err(tss("TPM2_ReadPublic", Some(h)))?
        } else {
            Self::create_ak(&mut ctx, ph, h)?
        };
        let ak = KeyHandle::from(obj);
        let (public, _, _) = ctx
            .read_public(ak)
            .map_err(tss("TPM2_ReadPublic", Some(h)))?;
        let bytes = public
            .marshall()
            .map_err(tss("Tss2_MU_TPMT_PUBLIC_Marshal", Some(h)))?;
        let ak_public = AkPublic::parse(&bytes)
            .map_err(|reason| TpmError::AkHandleOccupied { handle: h, reason })?;
        Ok(Self {
            ctx,
            cfg,
            ak,
            ak_public,
        })
    }

    fn create_ak(
        ctx: &mut Context,
        ph: PersistentTpmHandle,
        h: u32,
    ) -> Result<ObjectHandle, TpmError> {
        let template = ak_template().map_err(tss("AK template", None))?;
        let created = ctx
            .execute_with_sessions(PASSWORD, |c| {
                c.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
            })
            .map_err(tss("TPM2_CreatePrimary", Some(0x4000_000b)))?;
        let transient = created.key_handle;
        let persisted = ctx.execute_with_sessions(PASSWORD, |c| {
            c.evict_control(
                Provision::Owner,
                transient.into(),
                Persistent::Persistent(ph),
            )
        });
        let flushed = ctx.flush_context(transient.into());
        let persisted = persisted.map_err(tss("TPM2_EvictControl", Some(h)))?;
        flushed.map_err(tss("TPM2_FlushContext", None))?;
        Ok(persisted)
    }

    /// The configuration this TPM was opened with.
    pub fn config(&self) -> &TpmConfig {
        &self.cfg
    }

    /// The AK's public area.
    pub fn ak_public(&self) -> &AkPublic {
        &self.ak_public
    }

    /// TPM2_PCR_Reset of the measurement PCR.
    pub fn pcr_reset(&mut self) -> Result<(), TpmError> {
        let pcr = pcr_handle(self.cfg.pcr)?;
        self.ctx
            .execute_with_sessions(PASSWORD, |c| c.pcr_reset(pcr))
            .map_err(tss("TPM2_PCR_Reset", Some(u32::from(self.cfg.pcr))))
    }

    /// TPM2_PCR_Extend of the measurement PCR's SHA-256 bank with `digest`.
    pub fn pcr_extend(&mut self, digest: &Digest) -> Result<(), TpmError> {
        self.pcr_extend_at(self.cfg.pcr, digest)
    }

    /// TPM2_PCR_Read of the measurement PCR's SHA-256 value.
    pub fn pcr_read(&mut self) -> Result<Digest, TpmError> {
        self.pcr_read_at(self.cfg.pcr)
    }

    /// TPM2_PCR_Extend of PCR `pcr`'s SHA-256 bank with `digest` (the audit trail's anchor
    /// uses a PCR of its own).
    pub fn pcr_extend_at(&mut self, pcr: u8, digest: &Digest) -> Result<(), TpmError> {
        extend_pcr(&mut self.ctx, pcr, digest)
    }

    /// TPM2_PCR_Read of PCR `pcr`'s SHA-256 value.
    pub fn pcr_read_at(&mut self, pcr: u8) -> Result<Digest, TpmError> {
        read_pcr(&mut self.ctx, pcr)
    }

    /// TPM2_Quote of the measurement PCR with `qualifying_data`, by the AK.
    /// Returns (`TPMS_ATTEST` bytes, signature).
    pub fn quote(
        &mut self,
        qualifying_data: &Digest,
    ) -> Result<(Vec<u8>, EcdsaSignature), TpmError> {
        let sel = pcr_selection(self.cfg.pcr)?;
        let ak = self.ak;
        let data =
            Data::try_from(qualifying_data.to_vec()).map_err(tss("qualifying data", None))?;
        let (attest, sig) = self
            .ctx
            .execute_with_sessions(PASSWORD, |c| c.quote(ak, data, SignatureScheme::Null, sel))
            .map_err(tss("TPM2_Quote", Some(self.cfg.ak_handle)))?;
        let quote = attest
            .marshall()
            .map_err(tss("Tss2_MU_TPMS_ATTEST_Marshal", None))?;
        let Signature::EcDsa(s) = sig else {
            return Err(TpmError::Unexpected("signature scheme"));
        };
        let signature = EcdsaSignature {
            r: s.signature_r().value().to_vec().into(),
            s: s.signature_s().value().to_vec().into(),
        };
        Ok((quote, signature))
    }

    /// The EK certificate (DER) from the TCG NV index for the RSA 2048 EK (0x01c00002).
    pub fn ek_certificate(&mut self) -> Result<Vec<u8>, TpmError> {
        ek::retrieve_ek_pubcert(
            &mut self.ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        )
        .map_err(tss("TPM2_NV_Read", Some(0x01c0_0002)))
    }

    fn with_ek<T>(
        &mut self,
        f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, TpmError>,
    ) -> Result<T, TpmError> {
        let ek = ek::create_ek_object_2(
            &mut self.ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            None,
        )
        .map_err(tss("TPM2_CreatePrimary (EK)", Some(0x4000_000b)))?;
        let r = f(&mut self.ctx, ek);
        let flushed = self.ctx.flush_context(ek.into());
        let v = r?;
        flushed.map_err(tss("TPM2_FlushContext", None))?;
        Ok(v)
    }

    /// The RSA EK's public area (TCG default template, recreated from the endorsement seed).
    pub fn ek_public(&mut self) -> Result<Vec<u8>, TpmError> {
        self.with_ek(|c, ek| {
            let (p, _, _) = c.read_public(ek).map_err(tss("TPM2_ReadPublic", None))?;
            p.marshall()
                .map_err(tss("Tss2_MU_TPMT_PUBLIC_Marshal", None))
        })
    }

    /// Agent side of enrollment, step 1: the request for `agent`.
    pub fn enroll_request(&mut self, agent: AgentId) -> Result<EnrollRequest, TpmError> {
        Ok(EnrollRequest {
            agent,
            ek_cert: self.ek_certificate()?,
            ek_public: self.ek_public()?,
            ak_public: self.ak_public.as_bytes().to_vec(),
        })
    }

    /// Agent side of enrollment, step 3: TPM2_ActivateCredential with the EK (policy
    /// session with PolicySecret(TPM_RH_ENDORSEMENT)) and the AK.
    pub fn activate_credential(
        &mut self,
        ch: &EnrollChallenge,
    ) -> Result<EnrollResponse, TpmError> {
        let id = IdObject::try_from(ch.id_object.clone()).map_err(tss("credentialBlob", None))?;
        let secret =
            EncryptedSecret::try_from(ch.encrypted_secret.clone()).map_err(tss("secret", None))?;
        let ak = self.ak;
        let ak_h = self.cfg.ak_handle;
        self.with_ek(|c, ek| {
            let session = c
                .start_auth_session(
                    None,
                    None,
                    None,
                    SessionType::Policy,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
                .map_err(tss("TPM2_StartAuthSession", None))?
                .ok_or(TpmError::Unexpected("missing session"))?;
            let r = (|| {
                let policy =
                    PolicySession::try_from(session).map_err(tss("policy session", None))?;
                c.execute_with_sessions(PASSWORD, |c| {
                    c.policy_secret(
                        policy,
                        tss_esapi::handles::AuthHandle::Endorsement,
                        Nonce::default(),
                        TpmDigest::default(),
                        Nonce::default(),
                        None,
                    )
                })
                .map_err(tss("TPM2_PolicySecret", Some(0x4000_000b)))?;
                c.execute_with_sessions((Some(AuthSession::Password), Some(session), None), |c| {
                    c.activate_credential(ak, ek, id, secret)
                })
                .map_err(tss("TPM2_ActivateCredential", Some(ak_h)))
            })();
            let _ = c.flush_context(tss_esapi::handles::SessionHandle::from(session).into());
            let digest = r?;
            let secret = Zeroizing::new(digest.value().to_vec());
            Ok(EnrollResponse {
                secret: secret.to_vec(),
            })
        })
    }

    /// Remove the persistent AK (for tests and decommissioning).
    pub fn evict_ak(mut self) -> Result<(), TpmError> {
        let ph = PersistentTpmHandle::new(self.cfg.ak_handle)
            .map_err(|_| TpmError::BadHandle(self.cfg.ak_handle))?;
        let obj: ObjectHandle = self.ak.into();
        self.ctx
            .execute_with_sessions(PASSWORD, |c| {
                c.evict_control(Provision::Owner, obj, Persistent::Persistent(ph))
            })
            .map_err(tss("TPM2_EvictControl", Some(self.cfg.ak_handle)))?;
        Ok(())
    }
}

impl CredentialMaker for Tpm {
    fn make_credential(
        &mut self,
        ek_public: &[u8],
        ak_name: &[u8],
        secret: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), String> {
        let public = Public::unmarshall(ek_public).map_err(|e| e.to_string())?;
        let name = Name::try_from(ak_name.to_vec()).map_err(|e| e.to_string())?;
        let cred = TpmDigest::try_from(secret.to_vec()).map_err(|e| e.to_string())?;
        let key = self
            .ctx
            .execute_without_session(|c| c.load_external_public(public, Hierarchy::Null))
            .map_err(|e| tss("TPM2_LoadExternal", None)(e).to_string())?;
        let r = self
            .ctx
            .execute_without_session(|c| c.make_credential(key, cred, name))
            .map_err(|e| tss("TPM2_MakeCredential", None)(e).to_string());
        let _ = self.ctx.flush_context(key.into());
        let (id, enc) = r?;
        Ok((id.value().to_vec(), enc.value().to_vec()))
    }
}

/// A log this long is rebased before its next event (spec: attestation.md §5): half of what a
/// verifier accepts ([`MAX_EVENTS`]), so that no quote of a long-running agent is refused for
/// its log's length, and a rebase is rare (an agent extends one or two events per migration).
pub const REBASE_AT: usize = MAX_EVENTS / 2;

/// An [`Attester`] backed by a TPM: resets the PCR on open, extends measurements into it,
/// keeps the event log, and quotes.
pub struct TpmAttester {
    tpm: Tpm,
    log: Vec<Measurement>,
    /// What a rebase extends again: the latest event of each kind that describes this agent
    /// and what it offers (not a migration's final digest, which only its own quote needs),
    /// in the order the kinds first came.
    standing: Vec<Measurement>,
    /// A rebase began and did not finish (a TPM command failed): the log holds only part of
    /// `standing`, so the next measurement rebases again.
    rebasing: bool,
}

impl TpmAttester {
    /// Open the TPM, load or create the AK, reset the measurement PCR and start an empty log.
    pub fn open(cfg: TpmConfig) -> Result<Self, TpmError> {
        let mut tpm = Tpm::open(cfg)?;
        tpm.pcr_reset()?;
        Ok(Self {
            tpm,
            log: Vec::new(),
            standing: Vec::new(),
            rebasing: false,
        })
    }

    /// The TPM underneath (for enrollment and diagnostics).
    pub fn tpm(&mut self) -> &mut Tpm {
        &mut self.tpm
    }

    /// The event log so far.
    pub fn log(&self) -> &[Measurement] {
        &self.log
    }

    /// Extend `m` into the PCR, then append it to the log; a log of [`REBASE_AT`] events is
    /// rebased first.
    pub fn measure(&mut self, m: &Measurement) -> Result<(), TpmError> {
        if self.rebasing || self.log.len() >= REBASE_AT {
            self.rebase()?;
        }
        self.extend_logged(m)?;
        if !matches!(m, Measurement::MigrationFinal(_)) {
            let kind = std::mem::discriminant(m);
            match self
                .standing
                .iter_mut()
                .find(|s| std::mem::discriminant(*s) == kind)
            {
                Some(s) => *s = m.clone(),
                None => self.standing.push(m.clone()),
            }
        }
        Ok(())
    }

    /// Start the log again: reset the PCR and extend what stands (the executable measured at
    /// start, the configuration in force, the latest image manifest), so the log stays short
    /// and still says what this agent is. What was extended before is no longer in any later
    /// quote: a quote covers the log it carries, and each of this agent's quotes is taken
    /// under the lock that also covers the extension it needs (the source's handshake quote
    /// after its image manifest, a final quote after its digest).
    fn rebase(&mut self) -> Result<(), TpmError> {
        self.rebasing = true;
        self.tpm.pcr_reset()?;
        self.log.clear();
        for m in self.standing.clone() {
            self.extend_logged(&m)?;
        }
        self.rebasing = false;
        Ok(())
    }

    fn extend_logged(&mut self, m: &Measurement) -> Result<(), TpmError> {
        self.tpm.pcr_extend(&m.pcr_digest())?;
        self.log.push(m.clone());
        Ok(())
    }

    /// Quote and package evidence. Refuses (with [`TpmError::PcrDrift`]) if the PCR no longer
    /// matches the log; the verifier checks this independently.
    pub fn evidence(&mut self, qualifying_data: &Digest) -> Result<Evidence, TpmError> {
        if self.rebasing {
            // The log holds part of what stands: a quote over it could leave out what a
            // policy checks only when present (the configuration).
            self.rebase()?;
        }
        let actual = self.tpm.pcr_read()?;
        let expected = replay(&self.log);
        if !trustmig_protocol::ct_eq(&actual, &expected) {
            return Err(TpmError::PcrDrift {
                pcr: self.tpm.cfg.pcr,
                actual: hex::encode(actual),
                expected: hex::encode(expected),
            });
        }
        self.evidence_unchecked(qualifying_data)
    }

    /// Quote and package evidence without comparing the PCR to the log first.
    pub fn evidence_unchecked(&mut self, qualifying_data: &Digest) -> Result<Evidence, TpmError> {
        let (quote, signature) = self.tpm.quote(qualifying_data)?;
        Ok(Evidence {
            quote,
            signature,
            ak_public: self.tpm.ak_public.as_bytes().to_vec(),
            event_log: self.log.clone(),
        })
    }
}

impl Attester for TpmAttester {
    fn extend(&mut self, m: &Measurement) -> Result<(), AttestationError> {
        self.measure(m).map_err(AttestationError::new)
    }

    fn quote(&mut self, qualifying_data: &Digest) -> Result<Vec<u8>, AttestationError> {
        Ok(self
            .evidence(qualifying_data)
            .map_err(AttestationError::new)?
            .to_cbor())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::swtpm::{or_skip, Swtpm};
    use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
    use tss_esapi::structures::Ticket;
    use tss_esapi::structures::{HashcheckTicket, MaxBuffer};
    use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

    /// attestation.md §4, pinned against swtpm: the restricted AK signs a digest only with the
    /// TPM's ticket that it hashed the message itself, and the TPM gives no ticket for a
    /// message that begins with `TPM_GENERATED_VALUE` (as every `TPMS_ATTEST` does): so no
    /// one can have it sign an attestation structure the TPM did not make. An ordinary message
    /// the TPM hashed is signed (the refusals are the ticket's, not the key's).
    #[test]
    fn the_restricted_ak_signs_only_what_the_tpm_hashed_itself() {
        let Some(swtpm) = or_skip(Swtpm::start()) else {
            return;
        };
        let mut tpm = Tpm::open(TpmConfig::new(swtpm.tcti())).expect("open");
        let ak = tpm.ak;
        let sign = |tpm: &mut Tpm, digest: TpmDigest, ticket: HashcheckTicket| {
            tpm.ctx.execute_with_sessions(PASSWORD, |c| {
                c.sign(ak, digest, SignatureScheme::Null, ticket)
            })
        };
        let hash = |tpm: &mut Tpm, data: Vec<u8>| {
            let data = MaxBuffer::try_from(data).expect("buffer");
            (tpm.ctx)
                .hash(data, HashingAlgorithm::Sha256, Hierarchy::Owner)
                .expect("TPM2_Hash")
        };
        // A digest from outside, with no ticket (a NULL one): refused.
        let null = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .expect("a NULL ticket");
        let outside = TpmDigest::try_from(vec![7u8; 32]).expect("digest");
        let e = sign(&mut tpm, outside, null).expect_err("signed a digest from outside");
        assert!(e.to_string().to_lowercase().contains("ticket"), "{e}");
        // An ordinary message the TPM hashed: a ticket, and a signature.
        let (digest, ticket) = hash(&mut tpm, b"an ordinary message".to_vec());
        assert_eq!(ticket.hierarchy(), Hierarchy::Owner);
        sign(&mut tpm, digest, ticket).expect("signs what the TPM hashed");
        // A message that begins as a TPMS_ATTEST does: hashed, but no ticket.
        let mut forged = 0xff54_4347u32.to_be_bytes().to_vec();
        forged.extend_from_slice(b"\x80\x18 a quote of the forger's choosing");
        let (digest, ticket) = hash(&mut tpm, forged);
        assert_eq!(ticket.hierarchy(), Hierarchy::Null, "no ticket");
        let e = sign(&mut tpm, digest, ticket).expect_err("signed a forged attestation");
        assert!(e.to_string().to_lowercase().contains("ticket"), "{e}");
    }
}
