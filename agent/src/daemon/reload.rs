//! Reload (SIGHUP, `trustmig reload`): the configuration (VM list, transfer settings) and the
//! attestation policy are read again and replace the running ones as a whole, or, if either
//! does not load, neither does and the agent keeps what it had, saying why. Migrations under
//! way keep what they already took. The trust store needs no reload: it is read at every use.
//! The new configuration's digest is measured into the TPM (an `agent-config` event), so that
//! peers attest the configuration the agent now runs. What only a restart can change (listen
//! and metrics addresses, TPM, the concurrency limit, synthetic guests) is reported, not
//! applied: the running configuration keeps its values until then.

use std::sync::Arc;

use tracing::{info, warn};
use trustmig_protocol::attestation::{Attester, Measurement};

use crate::attestation::load_verifier;
use crate::config::Config;
use crate::ctx::Ctx;
use crate::error::AgentError;

/// One reload at a time: a SIGHUP's and a control socket's could otherwise interleave between
/// measuring one file and swapping in the other, leaving the agent running a configuration
/// older than the one its TPM log last says.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Reload; returns what changed, for the operator.
pub(super) fn reload(ctx: &Ctx) -> Result<String, AgentError> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let path = ctx.home.config();
    // One read: what is measured is what is parsed.
    let bytes = crate::home::read_limited(&path, crate::home::MAX_TEXT_FILE)?;
    let text = String::from_utf8(bytes.clone()).map_err(|e| AgentError::BadConfig {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut new = Config::parse(&text).map_err(|reason| AgentError::BadConfig {
        path: path.clone(),
        reason,
    })?;
    let verifier = load_verifier(&ctx.home.policy())?;
    let old = ctx.config();
    let later = at_next_start(&old, &mut new);
    // Synthetic guests live in this process, started at start: their entries stay as they were.
    new.vms.retain(|v| v.synthetic().is_none());
    new.vms
        .extend(old.vms.iter().filter(|v| v.synthetic().is_some()).cloned());
    // The kept synthetic entries may now collide with the new file's (a name made a QEMU VM).
    crate::config::check_vms_apart(&new.vms).map_err(|reason| AgentError::BadConfig {
        path: ctx.home.config(),
        reason: format!("{reason} (with the synthetic VMs kept from the start)"),
    })?;
    // From the in-use check to the swap no claim starts: one that did would run on the entry
    // this replaces (`Ctx::claims`). Claims wait meanwhile, up to one TPM extend.
    let _claims = ctx.claims.blocking_write();
    in_use(ctx, &old, &new)?;
    let digest = trustmig_protocol::sha256(&[&bytes]);
    crate::attestation::SharedTpm::new(&ctx.attester)
        .extend(&Measurement::AgentConfig(digest))
        .map_err(|e| AgentError::Tpm(e.to_string()))?;
    let vms = new.vms.len();
    *ctx.config.write().expect("config lock") = Arc::new(new);
    *ctx.verifier.write().expect("verifier lock") = Arc::new(verifier);
    let mut what = format!("reloaded: {vms} VM(s), attestation policy, configuration measured");
    if !later.is_empty() {
        what += &format!(
            "; changes to {} take effect at the next start",
            later.join(", ")
        );
    }
    Ok(what)
}

/// What of `new` takes effect only at the next start, by name (`new` keeps the running values
/// of what the running agent goes on using: what a reader of the configuration would otherwise
/// take for what runs).
fn at_next_start(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut later = Vec::new();
    // `status` shows it as the address listened on.
    if new.listen != old.listen {
        later.push("listen");
        new.listen.clone_from(&old.listen);
    }
    // Bound at start, like `listen`.
    if new.metrics_listen != old.metrics_listen {
        later.push("metrics_listen");
        new.metrics_listen.clone_from(&old.metrics_listen);
    }
    // The TPM was opened at start; the audit trail is anchored in the PCR it opened with.
    // Kept whole, so that the running `[tpm]` stays one the configuration's rules allow (a
    // measurement PCR from the file with the old audit PCR might be the same PCR).
    if (new.tpm.tcti.as_str(), new.tpm.pcr, new.tpm.ak_handle)
        != (old.tpm.tcti.as_str(), old.tpm.pcr, old.tpm.ak_handle)
    {
        later.push("tpm");
    }
    if new.tpm.audit_pcr != old.tpm.audit_pcr {
        later.push("tpm.audit_pcr");
    }
    new.tpm = old.tpm.clone();
    if new.transfer.max_concurrent_migrations != old.transfer.max_concurrent_migrations {
        later.push("transfer.max_concurrent_migrations");
        // What runs stays what the configuration says until the restart applies it.
        new.transfer.max_concurrent_migrations = old.transfer.max_concurrent_migrations;
    }
    let synthetic = |c: &Config| -> Vec<String> {
        let mut v: Vec<_> = (c.vms.iter())
            .filter(|v| v.synthetic().is_some())
            .map(|v| v.name.clone())
            .collect();
        v.sort();
        v
    };
    if synthetic(new) != synthetic(old) {
        later.push("synthetic VMs");
    }
    later
}

/// Refuse a reload that removes or changes a VM this agent is migrating (from here or to
/// here), has in doubt, or is giving back: the running migration or settlement needs the
/// entry it started with (a destination reads it again for the disks and the mirrors).
fn in_use(ctx: &Ctx, old: &Config, new: &Config) -> Result<(), AgentError> {
    for v in &old.vms {
        if old.same_vm(new, &v.name) {
            continue;
        }
        let busy = ctx.journal.lock().expect("journal lock").leaving(&v.name)
            || ctx.arriving.contains(&v.name)
            || ctx
                .parked
                .lock()
                .expect("parked lock")
                .contains_key(&v.name)
            || ctx
                .resuming
                .lock()
                .expect("resuming lock")
                .cause(&v.name)
                .is_some()
            || ctx.reconciling.contains(&v.name);
        if busy {
            return Err(AgentError::BadConfig {
                path: ctx.home.config(),
                reason: format!(
                    "VM {} is migrating (from or to here), in doubt, being given back or reconciled: its entry cannot change until that ends",
                    v.name
                ),
            });
        }
    }
    Ok(())
}

/// Reload and log the outcome (SIGHUP).
pub(super) fn on_signal(ctx: &Ctx) {
    match reload(ctx) {
        Ok(what) => info!("SIGHUP: {what}"),
        Err(e) => warn!("SIGHUP: reload refused, the running configuration is kept: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the agent binds at start is named by a reload and keeps its running value (the
    /// metrics address and the audit PCR went unnamed, the reply a plain "reloaded").
    #[test]
    fn what_binds_at_start_changes_at_the_next_start() {
        let text = crate::config::default_config_text("127.0.0.1:7443", "swtpm:port=1");
        let old = Config::parse(&text).unwrap();
        let mut same = Config::parse(&text).unwrap();
        assert!(at_next_start(&old, &mut same).is_empty());
        let changed = text
            .replace(
                "# metrics_listen = \"127.0.0.1:9187\"",
                "metrics_listen = \"127.0.0.1:9187\"",
            )
            .replace("pcr = 16", "pcr = 23")
            .replace("audit_pcr = 23", "audit_pcr = 16")
            .replace(
                "max_concurrent_migrations = 4",
                "max_concurrent_migrations = 2",
            )
            .replace("listen = \"127.0.0.1:7443\"", "listen = \"127.0.0.1:7444\"");
        let mut new = Config::parse(&changed).unwrap();
        assert_eq!(
            at_next_start(&old, &mut new),
            [
                "listen",
                "metrics_listen",
                "tpm",
                "tpm.audit_pcr",
                "transfer.max_concurrent_migrations"
            ]
        );
        assert_eq!(
            new.listen, "127.0.0.1:7443",
            "status shows where it listens"
        );
        assert_eq!(new.metrics_listen, None, "runs on without metrics");
        assert_eq!(
            (new.tpm.pcr, new.tpm.audit_pcr),
            (16, 23),
            "the TPM as opened"
        );
        assert_eq!(new.transfer.max_concurrent_migrations, 4);
    }
}
