//! The operator docs stay in step with the code. (Pure reading: no root.)

use datapath_common::DropReason;

#[test]
fn every_drop_reason_is_documented_with_its_number() {
    let page =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/why-dropped.md")).unwrap();
    for reason in DropReason::ALL {
        let row = format!("| {} | `{}` |", reason as u32, reason.name());
        assert!(page.contains(&row), "docs/why-dropped.md lacks the row for {reason:?}: {row}");
    }
}
