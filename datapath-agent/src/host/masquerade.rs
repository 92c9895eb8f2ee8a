//! Masquerading of pod traffic that leaves the cluster, with nftables (via
//! the `nftables` crate, which drives `nft -j`): one table of our own,
//! replaced atomically in one transaction, so a restart never opens a window
//! without the rule and never touches anyone else's rules. Conntrack entries of
//! live connections are not affected by replacing the rule.
//!
//!   table ip <table> { chain postrouting { type nat hook postrouting priority srcnat;
//!     ip saddr <cluster_cidr> ip daddr != <cluster_cidr> oifname <uplink> masquerade } }

use std::borrow::Cow;

use anyhow::Context as _;
use ipnet::Ipv4Net;
use nftables::{
    batch::Batch,
    expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix},
    helper,
    schema::{Chain, NfListObject, Rule, Table},
    stmt::{Match, Operator, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

pub const TABLE: &str = "datapath";

fn prefix(net: Ipv4Net) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(Cow::Owned(net.network().to_string()))),
        len: u32::from(net.prefix_len()),
    }))
}

fn ip_field(field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: Cow::Borrowed("ip"),
        field: Cow::Borrowed(field),
    })))
}

fn table() -> Table<'static> {
    Table { family: NfFamily::IP, name: Cow::Borrowed(TABLE), handle: None }
}

/// Install (or replace) the masquerade rule; `None` removes our table.
pub fn apply(rule: Option<(Ipv4Net, &str)>) -> anyhow::Result<()> {
    let mut batch = Batch::new();
    // add + delete: removes the table whether or not it existed.
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    if let Some((cluster_cidr, uplink)) = rule {
        batch.add(NfListObject::Table(table()));
        batch.add(NfListObject::Chain(Chain {
            family: NfFamily::IP,
            table: Cow::Borrowed(TABLE),
            name: Cow::Borrowed("postrouting"),
            _type: Some(NfChainType::NAT),
            hook: Some(NfHook::Postrouting),
            prio: Some(100),
            policy: Some(NfChainPolicy::Accept),
            ..Default::default()
        }));
        batch.add(NfListObject::Rule(Rule {
            family: NfFamily::IP,
            table: Cow::Borrowed(TABLE),
            chain: Cow::Borrowed("postrouting"),
            expr: Cow::Owned(vec![
                Statement::Match(Match {
                    left: ip_field("saddr"),
                    right: prefix(cluster_cidr),
                    op: Operator::EQ,
                }),
                Statement::Match(Match {
                    left: ip_field("daddr"),
                    right: prefix(cluster_cidr),
                    op: Operator::NEQ,
                }),
                Statement::Match(Match {
                    left: Expression::Named(NamedExpression::Meta(Meta { key: MetaKey::Oifname })),
                    right: Expression::String(Cow::Owned(uplink.to_owned())),
                    op: Operator::EQ,
                }),
                Statement::Masquerade(None),
            ]),
            comment: Some(Cow::Borrowed("datapath: pods to outside the cluster")),
            ..Default::default()
        }));
    }
    helper::apply_ruleset(&batch.to_nftables())
        .context("applying the masquerade table with nft (is nftables installed?)")
}

/// Remove our table if it is there (`cleanup`); whether it was.
pub fn remove_if_present() -> anyhow::Result<bool> {
    let ruleset =
        helper::get_current_ruleset().context("listing the nftables rule set (is nftables installed?)")?;
    let present = ruleset.objects.iter().any(|object| {
        matches!(object, nftables::schema::NfObject::ListObject(NfListObject::Table(t))
            if t.family == NfFamily::IP && t.name == TABLE)
    });
    if present {
        apply(None)?;
    }
    Ok(present)
}
