//! kube-proxy in nftables mode (its layout since Kubernetes 1.31) as a
//! baseline of the `services` bench suite, next to its iptables mode.
//!
//! One table `ip kube-proxy`: new connections to a cluster IP are looked up
//! in one verdict map (`service-ips`: address . protocol . port -> goto the
//! Service's chain), the Service's chain picks an endpoint with `numgen`
//! and a second verdict map, the endpoint's chain DNATs. The filter chains
//! kube-proxy hooks in (the endpoint and firewall checks, the reject of
//! cluster IPs on ports no Service has, the drop of unallocated cluster
//! IPs) are here too: each new connection pays them as with kube-proxy.
//! A change is what kube-proxy's partial sync sends for one endpoint of one
//! Service: one `nft -f -` transaction that writes the new endpoint's
//! chain, rewrites the Service's chain and deletes the old endpoint's.

use std::{net::SocketAddrV4, time::Duration};

use datapath_tests::{lab::CLUSTER_CIDR, sh};

use crate::{
    bench::{Pair, feed_in_netns},
    bench_services::{
        KP_BACKEND_IP, OTHER_BACKEND, RoutedPods, SERVER_PORT, SERVICE_PORT, Svc, VIP, chain_hash,
        service_list,
    },
};

pub(crate) const KUBE_PROXY_NFT: &str = "kube-proxy nftables";
/// The Service range kube-proxy drops unallocated addresses of.
const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Elements per `add element` statement (nft takes thousands at once).
const ELEMENTS_PER_STATEMENT: usize = 1_000;

/// kube-proxy's node in nftables mode: pods routed like Calico, its table.
pub(crate) struct KubeProxyNftSetup {
    pods: RoutedPods,
    services: Vec<Svc>,
}

impl KubeProxyNftSetup {
    pub(crate) fn new(prefix: &str, n: usize) -> anyhow::Result<Self> {
        let pods = RoutedPods::new(prefix, &format!("kpn{n}"));
        let setup = Self { pods, services: service_list(n, KP_BACKEND_IP) };
        setup.apply(&ruleset(&setup.services))?;
        let chains = setup.service_chains();
        anyhow::ensure!(
            chains == n,
            "kube-proxy's nftables table has {chains} Service chains for {n} Services"
        );
        Ok(setup)
    }

    pub(crate) fn pair(&self) -> Pair {
        Pair::between(KUBE_PROXY_NFT, &self.pods.client, &self.pods.backend, KP_BACKEND_IP)
            .via(SocketAddrV4::new(VIP, SERVICE_PORT), SERVER_PORT)
    }

    /// The node's own process as the client (kube-proxy's nat-output chain).
    pub(crate) fn node_pair(&self, name: &'static str) -> Pair {
        Pair::between(name, &self.pods.node, &self.pods.backend, KP_BACKEND_IP)
            .via(SocketAddrV4::new(VIP, SERVICE_PORT), SERVER_PORT)
    }

    /// `nft -f -` in the node with `text`; how long it took (spawn
    /// included: kube-proxy's knftables runs the same command).
    fn apply(&self, text: &str) -> anyhow::Result<Duration> {
        feed_in_netns(&self.pods.node.name, &["nft", "-f", "-"], text)
    }

    /// Service chains in the table (a sanity check that all N are there).
    fn service_chains(&self) -> usize {
        sh(&["ip", "netns", "exec", &self.pods.node.name, "nft", "list", "table", "ip", "kube-proxy"])
            .lines()
            // (A Service's chain names its port: "service-<hash>-ns/name/tcp/port".)
            .filter(|l| l.trim_start().starts_with("chain service-") && l.contains('/'))
            .count()
    }

    /// Times (ms) of `changes` partial syncs, each moving Service 0's one
    /// endpoint to the other address and back; the table is left as it was.
    pub(crate) fn change_ms(&mut self, changes: usize) -> anyhow::Result<Vec<f64>> {
        let original = self.services[0].backend;
        let other = SocketAddrV4::new(OTHER_BACKEND, SERVER_PORT);
        let mut times = Vec::with_capacity(changes);
        for k in 0..changes {
            let (from, to) = if k % 2 == 0 { (original, other) } else { (other, original) };
            let text = endpoint_change(&self.services[0], from, to);
            times.push(self.apply(&text)?.as_secs_f64() * 1e3);
            self.services[0].backend = to;
        }
        if self.services[0].backend != original {
            let text = endpoint_change(&self.services[0], self.services[0].backend, original);
            self.apply(&text)?;
            self.services[0].backend = original;
        }
        Ok(times)
    }
}

/// The port's name as kube-proxy writes it in chain names.
fn port_name(s: &Svc) -> String {
    format!("bench/{}/tcp/http", s.name)
}

pub(crate) fn service_chain(s: &Svc) -> String {
    let name = port_name(s);
    format!("service-{}-{name}", &chain_hash(&name)[..8])
}

fn endpoint_chain(s: &Svc, endpoint: SocketAddrV4) -> String {
    let name = format!("{}__{}/{}", port_name(s), endpoint.ip(), endpoint.port());
    format!("endpoint-{}-{name}", &chain_hash(&name)[..8])
}

/// The Service's chain and its endpoint's, as kube-proxy fills them.
fn service_rules(out: &mut String, s: &Svc, endpoint: SocketAddrV4) {
    let (svc, ep) = (service_chain(s), endpoint_chain(s, endpoint));
    let t = "ip kube-proxy";
    out.push_str(&format!(
        "add chain {t} {ep}\nflush chain {t} {ep}\n\
         add rule {t} {ep} ip saddr {} jump mark-for-masquerade\n\
         add rule {t} {ep} meta l4proto tcp dnat to {endpoint}\n\
         add chain {t} {svc}\nflush chain {t} {svc}\n\
         add rule {t} {svc} ip daddr {} tcp dport {SERVICE_PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n\
         add rule {t} {svc} numgen random mod 1 vmap {{ 0 : goto {ep} }}\n",
        endpoint.ip(),
        s.vip,
    ));
}

/// The whole table for `services` (one TCP port each, one endpoint), as
/// kube-proxy's full sync writes it, replacing any table of that name.
pub(crate) fn ruleset(services: &[Svc]) -> String {
    let t = "ip kube-proxy";
    let mut out = format!(
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}\ndelete table {t}\n\
         add table {t} {{ comment \"rules for kube-proxy\" ; }}\n\
         add chain {t} mark-for-masquerade\nadd rule {t} mark-for-masquerade mark set mark or 0x4000\n\
         add chain {t} masquerading\n\
         add rule {t} masquerading mark and 0x4000 == 0 return\n\
         add rule {t} masquerading mark set mark xor 0x4000\n\
         add rule {t} masquerading masquerade fully-random\n\
         add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}\n\
         add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; }}\n\
         add set {t} nodeport-ips {{ type ipv4_addr ; }}\n\
         add set {t} cluster-ips {{ type ipv4_addr ; }}\n\
         add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}\n\
         add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; }}\n\
         add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}\n\
         add chain {t} services\n\
         add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n\
         add chain {t} firewall-check\n\
         add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n\
         add chain {t} service-endpoints-check\n\
         add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
         add chain {t} nodeport-endpoints-check\n\
         add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports\n\
         add chain {t} cluster-ips-check\n\
         add rule {t} cluster-ips-check ip daddr @cluster-ips reject\n\
         add rule {t} cluster-ips-check ip daddr {SERVICE_CIDR} drop\n\
         add chain {t} filter-prerouting {{ type filter hook prerouting priority dstnat - 10 ; }}\n\
         add rule {t} filter-prerouting ct state new jump firewall-check\n\
         add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}\n\
         add rule {t} filter-forward ct state new jump service-endpoints-check\n\
         add rule {t} filter-forward ct state new jump cluster-ips-check\n\
         add chain {t} filter-input {{ type filter hook input priority -110 ; }}\n\
         add rule {t} filter-input ct state new jump nodeport-endpoints-check\n\
         add rule {t} filter-input ct state new jump service-endpoints-check\n\
         add chain {t} filter-output {{ type filter hook output priority -110 ; }}\n\
         add rule {t} filter-output ct state new jump service-endpoints-check\n\
         add rule {t} filter-output ct state new jump firewall-check\n\
         add chain {t} filter-output-post-dnat {{ type filter hook output priority -90 ; }}\n\
         add rule {t} filter-output-post-dnat ct state new jump cluster-ips-check\n\
         add chain {t} nat-prerouting {{ type nat hook prerouting priority dstnat ; }}\n\
         add rule {t} nat-prerouting jump services\n\
         add chain {t} nat-output {{ type nat hook output priority -100 ; }}\n\
         add rule {t} nat-output jump services\n\
         add chain {t} nat-postrouting {{ type nat hook postrouting priority srcnat ; }}\n\
         add rule {t} nat-postrouting jump masquerading\n"
    );
    for s in services {
        service_rules(&mut out, s, s.backend);
    }
    for chunk in services.chunks(ELEMENTS_PER_STATEMENT) {
        let vmap: Vec<String> = chunk
            .iter()
            .map(|s| format!("{} . tcp . {SERVICE_PORT} : goto {}", s.vip, service_chain(s)))
            .collect();
        out.push_str(&format!("add element {t} service-ips {{ {} }}\n", vmap.join(", ")));
        let ips: Vec<String> = chunk.iter().map(|s| s.vip.to_string()).collect();
        out.push_str(&format!("add element {t} cluster-ips {{ {} }}\n", ips.join(", ")));
    }
    out
}

/// kube-proxy's partial sync when Service `s`'s one endpoint moves from
/// `from` to `to`: the new endpoint's chain, the Service's chain rewritten
/// to it, the old endpoint's chain flushed and deleted; the maps keep
/// their elements (the Service's chain name does not change).
fn endpoint_change(s: &Svc, from: SocketAddrV4, to: SocketAddrV4) -> String {
    let mut out = String::new();
    service_rules(&mut out, s, to);
    let old = endpoint_chain(s, from);
    out.push_str(&format!("flush chain ip kube-proxy {old}\ndelete chain ip kube-proxy {old}\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_maps_every_cluster_ip_to_its_service_chain() {
        let all = service_list(2_500, KP_BACKEND_IP);
        let text = ruleset(&all);
        assert_eq!(text.matches(" : goto service-").count(), 2_500);
        assert_eq!(
            text.lines().filter(|l| l.starts_with("add element ip kube-proxy service-ips")).count(),
            3
        );
        let measured = all.last().unwrap();
        assert_eq!(measured.vip, VIP);
        assert!(text.contains(&format!("{VIP} . tcp . 80 : goto {}", service_chain(measured))));
        assert!(text.contains("meta l4proto tcp dnat to 10.244.1.3:8080\n"));
        let change = endpoint_change(&all[0], all[0].backend, SocketAddrV4::new(OTHER_BACKEND, SERVER_PORT));
        assert!(change.contains(&format!("dnat to {OTHER_BACKEND}:{SERVER_PORT}")));
        assert!(
            change
                .contains(&format!("delete chain ip kube-proxy {}", endpoint_chain(&all[0], all[0].backend)))
        );
    }
}
