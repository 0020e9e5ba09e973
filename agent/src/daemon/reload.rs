//! Reload (SIGHUP, `trustmig reload`): the configuration (VM list, transfer settings) and the
//! attestation policy are read again and replace the running ones as a whole, or, if either
//! does not load, neither does and the agent keeps what it had, saying why. Migrations under
//! way keep what they already took. The trust store needs no reload: it is read at every use.
//! The new configuration's digest is measured into the TPM (an `agent-config` event), so that
//! peers attest the configuration the agent now runs. What only a restart can change (listen
//! address, TPM, the concurrency limit, synthetic guests) is reported, not applied.

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
    let bytes = std::fs::read(&path).map_err(AgentError::io(&path))?;
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
    let mut later = Vec::new();
    if new.listen != old.listen {
        later.push("listen");
    }
    if (new.tpm.tcti.as_str(), new.tpm.pcr, new.tpm.ak_handle)
        != (old.tpm.tcti.as_str(), old.tpm.pcr, old.tpm.ak_handle)
    {
        later.push("tpm");
    }
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
    if synthetic(&new) != synthetic(&old) {
        later.push("synthetic VMs");
    }
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
