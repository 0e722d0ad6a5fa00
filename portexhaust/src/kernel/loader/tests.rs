use super::*;

/// Every entry of the program table exists in the object with a matching program type, and
/// every program in the object is in the table: the two cannot disagree.
#[test]
fn program_table_matches_the_object() {
    let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
    for p in programs::PROGRAMS {
        let prog = obj
            .programs
            .get(p.name)
            .unwrap_or_else(|| panic!("{} is not in the object", p.name));
        use aya_obj::ProgramSection as S;
        let ok = matches!(
            (&p.hook, &prog.section),
            (Hook::TracePoint { .. }, S::TracePoint)
                | (Hook::BtfTracePoint(_), S::BtfTracePoint)
                | (Hook::RawTracePoint(_), S::RawTracePoint)
                | (Hook::FEntry(_), S::FEntry { .. })
                | (Hook::FExit(_), S::FExit { .. })
                | (Hook::KProbe(_), S::KProbe)
                | (Hook::KRetProbe(_), S::KRetProbe)
        );
        assert!(
            ok,
            "{}: table says {:?}, object has {:?}",
            p.name, p.hook, prog.section
        );
    }
    for name in obj.programs.keys() {
        assert!(
            programs::PROGRAMS.iter().any(|p| p.name == name.as_str()),
            "{name} is in the object but not in the program table"
        );
    }
}

#[test]
fn budgets_split_between_cpus() {
    assert_eq!(per_cpu_budget(0, 8), 0);
    assert_eq!(per_cpu_budget(1000, 2), 500);
    assert_eq!(per_cpu_budget(1000, 3), 334);
    assert_eq!(per_cpu_budget(1, 64), 1);
    assert_eq!(per_cpu_budget(5, 0), 5);
}

#[test]
fn auto_tries_every_backend_once() {
    let mut v = AUTO_ORDER.to_vec();
    v.sort();
    v.dedup();
    assert_eq!(v.len(), Backend::ALL.len());
}
