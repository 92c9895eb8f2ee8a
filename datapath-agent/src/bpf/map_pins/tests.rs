use super::*;
use crate::bpf::map_layout::{Upgrade, layout};

const ENDPOINTS: Shape =
    Shape { map_type: MapType::Hash, key_size: 4, value_size: 24, max_entries: 65_536, flags: 0 };

#[test]
fn a_pin_of_this_layout_is_reused_and_a_resized_one_migrated() {
    let endpoints = layout(map_names::ENDPOINTS).unwrap();
    assert_eq!(verdict(endpoints, &ENDPOINTS, 1, &ENDPOINTS), Verdict::Reuse);
    let smaller = Shape { max_entries: 1024, ..ENDPOINTS };
    assert_eq!(
        verdict(endpoints, &ENDPOINTS, 1, &smaller),
        Verdict::Migrate(Reason::Resized { from: smaller })
    );
    let other_flags = Shape { flags: 1, ..ENDPOINTS };
    assert_eq!(
        verdict(endpoints, &ENDPOINTS, 1, &other_flags),
        Verdict::Migrate(Reason::Resized { from: other_flags })
    );
}

#[test]
fn a_pin_this_build_cannot_read_is_refused_unless_its_loss_is_harmless() {
    let endpoints = layout(map_names::ENDPOINTS).unwrap();
    let wider = Shape { value_size: 28, ..ENDPOINTS };
    assert_eq!(verdict(endpoints, &ENDPOINTS, 1, &wider), Verdict::OtherShape);
    let lru = Shape { map_type: MapType::LruHash, ..ENDPOINTS };
    assert_eq!(verdict(endpoints, &ENDPOINTS, 1, &lru), Verdict::OtherShape);
    // The same shape under another version is not the same meaning.
    assert_eq!(verdict(endpoints, &ENDPOINTS, 2, &ENDPOINTS), Verdict::Newer);
    assert_eq!(verdict(endpoints, &ENDPOINTS, 0, &ENDPOINTS), Verdict::NoUpgrade);

    let drops = layout(map_names::DROP_COUNTERS).unwrap();
    let counters =
        Shape { map_type: MapType::PerCpuArray, key_size: 4, value_size: 16, max_entries: 192, flags: 0 };
    let wide = Shape { value_size: 24, ..counters };
    let incompatible = Reason::Incompatible { version: 2, found: wide };
    assert_eq!(verdict(drops, &counters, 2, &wide), Verdict::Replace(incompatible));
    let newer = Reason::Incompatible { version: 3, found: counters };
    assert_eq!(verdict(drops, &counters, 3, &counters), Verdict::Replace(newer));
    let grown = Shape { max_entries: 128, ..counters };
    assert_eq!(verdict(drops, &counters, 2, &grown), Verdict::Migrate(Reason::Resized { from: grown }));
    // v1 counted packets only (8-byte values), in fewer slots: converted.
    let packets_only = Shape { value_size: 8, max_entries: 128, ..counters };
    assert_eq!(verdict(drops, &counters, 1, &packets_only), Verdict::Upgrade(1));
}

#[test]
fn an_older_version_with_a_conversion_is_upgraded() {
    const UPGRADES: &[Upgrade] = &[Upgrade { from_version: 1, entries: Entries::Discarded }];
    let endpoints = MapLayout { version: 2, upgrades: UPGRADES, ..*layout(map_names::ENDPOINTS).unwrap() };
    assert_eq!(verdict(&endpoints, &ENDPOINTS, 1, &ENDPOINTS), Verdict::Upgrade(1));
    assert_eq!(verdict(&endpoints, &ENDPOINTS, 0, &ENDPOINTS), Verdict::NoUpgrade);
    assert_eq!(verdict(&endpoints, &ENDPOINTS, 3, &ENDPOINTS), Verdict::Newer);
}

#[test]
fn both_program_builds_define_the_same_maps() {
    // Switching between them (ebpf_log) must never migrate a map.
    let normal = expected_shapes(crate::bpf::ebpf::DATAPATH_OBJECT, &[]).unwrap();
    let debug = expected_shapes(crate::bpf::ebpf::DATAPATH_DEBUG_OBJECT, &[]).unwrap();
    assert_eq!(normal, debug);
    assert_eq!(normal.len(), LAYOUTS.len());
    assert_eq!(normal[map_names::ENDPOINTS], ENDPOINTS);
    let ring = normal[map_names::MONITOR_EVENTS];
    assert_eq!(
        (ring.map_type, ring.key_size, ring.value_size),
        (MapType::RingBuf, 0, 0),
        "as aya creates it"
    );
    let sized = expected_shapes(crate::bpf::ebpf::DATAPATH_OBJECT, &[(map_names::CONNTRACK, 4096)]).unwrap();
    assert_eq!(sized[map_names::CONNTRACK].max_entries, 4096);
}

#[test]
fn refusals_name_the_map_the_pin_and_what_to_do() {
    let message = LayoutError::OtherShape {
        name: map_names::ENDPOINTS,
        pin: PathBuf::from("/sys/fs/bpf/datapath/maps/endpoints-v1"),
        version: 1,
        found: Shape { value_size: 20, ..ENDPOINTS },
        expected: ENDPOINTS,
        holds: "the local pods' delivery entries",
    }
    .to_string();
    for part in [
        "map ENDPOINTS",
        "/sys/fs/bpf/datapath/maps/endpoints-v1",
        "20-byte values",
        "24-byte values",
        "remove",
    ] {
        assert!(message.contains(part), "{part:?} missing in: {message}");
    }
}
