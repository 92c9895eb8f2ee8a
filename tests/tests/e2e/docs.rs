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

/// The "where" of each reason's row names the programs
/// `DropReason::directions` says may drop for it (the pairs `/metrics`
/// exports from 0).
#[test]
fn every_drop_reason_names_the_programs_that_may_drop_for_it() {
    let page =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/why-dropped.md")).unwrap();
    for reason in DropReason::ALL {
        let start = format!("| {} | `{}` | ", reason as u32, reason.name());
        let row = page.lines().find_map(|l| l.strip_prefix(start.as_str())).unwrap();
        let documented: Vec<&str> = row.split(" | ").next().unwrap().split(", ").collect();
        let declared: Vec<&str> = reason.directions().iter().map(|d| d.name()).collect();
        assert_eq!(documented, declared, "{reason:?}");
    }
}
