//! Just enough X.509 (DER) to check that an EK certificate chains to a trusted CA, in pure
//! Rust with ring doing the signatures. spec: attestation.md §7.2
//!
//! Supported: RSA PKCS#1 v1.5 (SHA-256/384/512) and ECDSA (P-256/SHA-256, P-384/SHA-384)
//! signatures; validity periods; basicConstraints cA on issuers. Name matching is by exact
//! DER bytes.

use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};

/// A certificate or chain that was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// Not DER of the expected structure.
    #[error("certificate is malformed: {0}")]
    Malformed(&'static str),
    /// PEM text without a certificate, or bad base64.
    #[error("PEM is malformed: {0}")]
    Pem(&'static str),
    /// Signature or key algorithm not supported.
    #[error("unsupported algorithm: {0}")]
    Unsupported(&'static str),
    /// No trusted anchor (directly or through intermediates) signed this certificate.
    #[error("certificate issued by {issuer} does not chain to a trusted CA")]
    Untrusted {
        /// Issuer name (DER, hex).
        issuer: String,
    },
    /// Outside its validity period.
    #[error("certificate {subject} is not valid at time {now} (valid {not_before}..={not_after})")]
    Expired {
        /// Subject (DER, hex).
        subject: String,
        /// Checked time (Unix seconds).
        now: i64,
        /// notBefore (Unix seconds).
        not_before: i64,
        /// notAfter (Unix seconds).
        not_after: i64,
    },
}

struct Der<'a> {
    buf: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    fn peek_tag(&self) -> Option<u8> {
        self.buf.first().copied()
    }
    /// Next TLV: (tag, contents, whole TLV bytes).
    fn next(&mut self) -> Result<(u8, &'a [u8], &'a [u8]), CertError> {
        let m = CertError::Malformed("truncated DER");
        let tag = *self.buf.first().ok_or(m.clone())?;
        let first = *self.buf.get(1).ok_or(m.clone())?;
        let (len, hdr) = if first < 0x80 {
            (usize::from(first), 2)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 {
                return Err(CertError::Malformed("unsupported DER length"));
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | usize::from(*self.buf.get(2 + i).ok_or(m.clone())?);
            }
            (len, 2 + n)
        };
        let end = hdr.checked_add(len).ok_or(m.clone())?;
        let whole = self.buf.get(..end).ok_or(m)?;
        self.buf = &self.buf[end..];
        Ok((tag, &whole[hdr..], whole))
    }
    fn expect(&mut self, tag: u8, what: &'static str) -> Result<&'a [u8], CertError> {
        let (t, c, _) = self.next()?;
        if t != tag {
            return Err(CertError::Malformed(what));
        }
        Ok(c)
    }
}

const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_SHA256_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
const OID_SHA384_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
const OID_SHA512_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
const OID_ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
const OID_BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];

/// Public key kinds found in certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
}

/// A parsed certificate (borrowing nothing; small).
#[derive(Clone, Debug)]
pub struct Certificate {
    der: Vec<u8>,
    tbs: (usize, usize),
    sig_alg: Vec<u8>,
    signature: Vec<u8>,
    issuer: Vec<u8>,
    subject: Vec<u8>,
    not_before: i64,
    not_after: i64,
    key_kind: KeyKind,
    /// Contents of the SPKI BIT STRING (after the unused-bits byte).
    key: Vec<u8>,
    is_ca: bool,
}

fn bit_string(c: &[u8]) -> Result<&[u8], CertError> {
    match c.split_first() {
        Some((0, rest)) => Ok(rest),
        _ => Err(CertError::Malformed("BIT STRING with unused bits")),
    }
}

fn parse_time(tag: u8, c: &[u8]) -> Result<i64, CertError> {
    let bad = CertError::Malformed("bad time");
    if !c.is_ascii() {
        return Err(bad);
    }
    let s = std::str::from_utf8(c).map_err(|_| bad.clone())?;
    let (year, rest) = match (tag, s.len()) {
        (0x17, 13) => {
            let yy: i64 = s[0..2].parse().map_err(|_| bad.clone())?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        (0x18, 15) => (s[0..4].parse().map_err(|_| bad.clone())?, &s[4..]),
        _ => return Err(bad),
    };
    if !rest.ends_with('Z') || !rest[..10].bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    let f = |i: usize| -> i64 { rest[i..i + 2].parse().unwrap_or(0) };
    let (mo, d, h, mi, se) = (f(0), f(2), f(4), f(6), f(8));
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(bad);
    }
    // days_from_civil (H. Hinnant).
    let y = if mo <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days * 86_400 + h * 3600 + mi * 60 + se)
}

impl Certificate {
    /// Parse one DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, CertError> {
        let mut outer = Der::new(der);
        let cert = outer.expect(0x30, "Certificate is not a SEQUENCE")?;
        if !outer.is_empty() {
            return Err(CertError::Malformed("trailing bytes after Certificate"));
        }
        let mut c = Der::new(cert);
        let (tag, tbs, tbs_whole) = c.next()?;
        if tag != 0x30 {
            return Err(CertError::Malformed("tbsCertificate is not a SEQUENCE"));
        }
        let tbs_start = tbs_whole.as_ptr() as usize - der.as_ptr() as usize;
        let mut alg = Der::new(c.expect(0x30, "signatureAlgorithm")?);
        let sig_alg = alg.expect(0x06, "signatureAlgorithm OID")?.to_vec();
        let signature = bit_string(c.expect(0x03, "signatureValue")?)?.to_vec();
        if !c.is_empty() {
            return Err(CertError::Malformed("trailing fields in Certificate"));
        }
        let mut t = Der::new(tbs);
        if t.peek_tag() == Some(0xa0) {
            t.next()?;
        }
        t.expect(0x02, "serialNumber")?;
        t.expect(0x30, "signature")?;
        let (tag, _, issuer) = t.next()?;
        if tag != 0x30 {
            return Err(CertError::Malformed("issuer"));
        }
        let mut validity = Der::new(t.expect(0x30, "validity")?);
        let (nbt, nb, _) = validity.next()?;
        let (nat, na, _) = validity.next()?;
        let not_before = parse_time(nbt, nb)?;
        let not_after = parse_time(nat, na)?;
        let (tag, _, subject) = t.next()?;
        if tag != 0x30 {
            return Err(CertError::Malformed("subject"));
        }
        let mut spki = Der::new(t.expect(0x30, "subjectPublicKeyInfo")?);
        let mut kalg = Der::new(spki.expect(0x30, "SPKI algorithm")?);
        let koid = kalg.expect(0x06, "SPKI algorithm OID")?;
        let key_kind = if koid == OID_RSA_ENCRYPTION {
            KeyKind::Rsa
        } else if koid == OID_EC_PUBLIC_KEY {
            match kalg.expect(0x06, "EC curve OID")? {
                c if c == OID_P256 => KeyKind::P256,
                c if c == OID_P384 => KeyKind::P384,
                _ => return Err(CertError::Unsupported("EC curve")),
            }
        } else {
            return Err(CertError::Unsupported("public key algorithm"));
        };
        let key = bit_string(spki.expect(0x03, "subjectPublicKey")?)?.to_vec();
        let mut is_ca = false;
        while !t.is_empty() {
            let (tag, body, _) = t.next()?;
            if tag != 0xa3 {
                continue;
            }
            let mut exts = Der::new(Der::new(body).expect(0x30, "extensions")?);
            while !exts.is_empty() {
                let mut ext = Der::new(exts.expect(0x30, "extension")?);
                let oid = ext.expect(0x06, "extension OID")?;
                let (mut tag, mut val, _) = ext.next()?;
                if tag == 0x01 {
                    (tag, val, _) = ext.next()?;
                }
                if tag != 0x04 {
                    return Err(CertError::Malformed("extension value"));
                }
                if oid == OID_BASIC_CONSTRAINTS {
                    let mut bc = Der::new(Der::new(val).expect(0x30, "basicConstraints")?);
                    if bc.peek_tag() == Some(0x01) {
                        is_ca = bc.expect(0x01, "cA")? == [0xff];
                    }
                }
            }
        }
        Ok(Self {
            der: der.to_vec(),
            tbs: (tbs_start, tbs_start + tbs_whole.len()),
            sig_alg,
            signature,
            issuer: issuer.to_vec(),
            subject: subject.to_vec(),
            not_before,
            not_after,
            key_kind,
            key,
            is_ca,
        })
    }

    /// The DER bytes.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The RSA modulus (leading zero stripped) if this is an RSA key.
    pub fn rsa_public(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        if self.key_kind != KeyKind::Rsa {
            return None;
        }
        let mut outer = Der::new(&self.key);
        let mut seq = Der::new(outer.expect(0x30, "RSAPublicKey").ok()?);
        let n = seq.expect(0x02, "modulus").ok()?;
        let e = seq.expect(0x02, "exponent").ok()?;
        let strip = |v: &[u8]| {
            v.iter()
                .skip_while(|b| **b == 0)
                .copied()
                .collect::<Vec<u8>>()
        };
        Some((strip(n), strip(e)))
    }

    /// Subject name (DER).
    pub fn subject(&self) -> &[u8] {
        &self.subject
    }

    fn verify_signed_by(&self, issuer: &Certificate) -> bool {
        let alg: &dyn VerificationAlgorithm = match (self.sig_alg.as_slice(), issuer.key_kind) {
            (a, KeyKind::Rsa) if a == OID_SHA256_RSA => &signature::RSA_PKCS1_2048_8192_SHA256,
            (a, KeyKind::Rsa) if a == OID_SHA384_RSA => &signature::RSA_PKCS1_2048_8192_SHA384,
            (a, KeyKind::Rsa) if a == OID_SHA512_RSA => &signature::RSA_PKCS1_2048_8192_SHA512,
            (a, KeyKind::P256) if a == OID_ECDSA_SHA256 => &signature::ECDSA_P256_SHA256_ASN1,
            (a, KeyKind::P384) if a == OID_ECDSA_SHA384 => &signature::ECDSA_P384_SHA384_ASN1,
            _ => return false,
        };
        UnparsedPublicKey::new(alg, &issuer.key)
            .verify(&self.der[self.tbs.0..self.tbs.1], &self.signature)
            .is_ok()
    }

    /// Its validity period (`notBefore`, `notAfter`), Unix seconds.
    pub fn validity(&self) -> (i64, i64) {
        (self.not_before, self.not_after)
    }

    fn check_time(&self, now: i64) -> Result<(), CertError> {
        if now < self.not_before || now > self.not_after {
            return Err(CertError::Expired {
                subject: hex::encode(&self.subject),
                now,
                not_before: self.not_before,
                not_after: self.not_after,
            });
        }
        Ok(())
    }
}

/// Most certificates between a leaf and its anchor.
const MAX_CHAIN: usize = 4;

/// Check that `leaf` chains to one of `anchors`, possibly through `intermediates` (which must
/// be CA certificates), every certificate valid at `now` (Unix seconds).
pub fn verify_chain(
    leaf: &Certificate,
    intermediates: &[Certificate],
    anchors: &[Certificate],
    now: i64,
) -> Result<(), CertError> {
    leaf.check_time(now)?;
    let mut cur = leaf;
    for _ in 0..=MAX_CHAIN {
        if let Some(a) = anchors
            .iter()
            .find(|a| a.subject == cur.issuer && cur.verify_signed_by(a))
        {
            return a.check_time(now);
        }
        match intermediates
            .iter()
            .find(|i| i.is_ca && i.subject == cur.issuer && cur.verify_signed_by(i))
        {
            Some(i) => {
                i.check_time(now)?;
                cur = i;
            }
            None => break,
        }
    }
    Err(CertError::Untrusted {
        issuer: hex::encode(&cur.issuer),
    })
}

/// Decode every `CERTIFICATE` block of a PEM text to DER.
pub fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>, CertError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(b) = rest.find(BEGIN) {
        let body_start = b + BEGIN.len();
        let e = rest[body_start..]
            .find(END)
            .ok_or(CertError::Pem("unterminated block"))?;
        out.push(base64_decode(&rest[body_start..body_start + e])?);
        rest = &rest[body_start + e + END.len()..];
    }
    if out.is_empty() {
        return Err(CertError::Pem("no CERTIFICATE block"));
    }
    Ok(out)
}

fn base64_decode(s: &str) -> Result<Vec<u8>, CertError> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    let mut pad = false;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => {
                pad = true;
                continue;
            }
            b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return Err(CertError::Pem("bad base64 character")),
        };
        if pad {
            return Err(CertError::Pem("data after base64 padding"));
        }
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}
