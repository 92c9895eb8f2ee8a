//! Keeping the policy maps at what the policy objects and this node's
//! pods compile to. A change (objects, or a pod added or removed) is
//! compiled whole and written as the difference from what the maps hold,
//! so only the entries that change are written.

use std::collections::BTreeSet;

use crate::{
    bpf::{
        Datapath, DatapathError,
        policy::{PolicyMaps, PolicyWriteReport},
    },
    model::{LocalPod, PolicyObjects},
    reconcile::policy::compile,
};

#[derive(Default)]
pub struct PolicySync {
    /// What the source said last; `None` until it first did: until then the
    /// maps stay as an earlier agent left them (its policy keeps applying).
    objects: Option<PolicyObjects>,
    /// What the maps hold, read at the first sync and kept up to date by
    /// each write (the agent is their only writer); `None` after a failed
    /// write, so the next sync reads them again.
    programmed: Option<PolicyMaps>,
    /// Problems already logged (each is said once, not at every sync).
    said: BTreeSet<String>,
}

impl PolicySync {
    pub fn set_objects(&mut self, objects: PolicyObjects) {
        self.objects = Some(objects);
    }

    /// Bring the maps to what the objects compile to for `local`.
    pub fn sync(
        &mut self,
        datapath: &mut Datapath,
        local: &[LocalPod],
    ) -> Result<Option<PolicyWriteReport>, DatapathError> {
        let Some(objects) = &self.objects else { return Ok(None) };
        let compiled = compile(objects, local);
        let problems: BTreeSet<String> = compiled.problems.into_iter().collect();
        for problem in problems.difference(&self.said) {
            tracing::warn!(problem = %problem, "NetworkPolicy: left out (the pods it selects are refused what it would allow)");
        }
        self.said = problems;
        let current = match self.programmed.take() {
            Some(current) => current,
            None => datapath.policy_maps()?,
        };
        let report = datapath.write_policy_maps(&current, &compiled.maps)?;
        self.programmed = Some(compiled.maps);
        Ok(Some(report))
    }
}
