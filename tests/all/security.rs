//! What tests/all/admin.rs (401, 403, 413, refused uploads) and
//! host/tests/runtime.rs (imports refused at load, tampered compiled
//! artifacts recompiled) do not cover: instances of modules share nothing,
//! and the admin API listens on loopback unless configured otherwise.

use wagg::admin::AdminConfig;
use wagg::runtime::{Batch, Runtime, RuntimeLimits};

#[test]
fn two_instances_of_one_module_share_no_memory_or_state() {
    let rt = Runtime::new(RuntimeLimits::default(), None).unwrap();
    let module = rt.load(wagg::runtime::builtin("hashmap").unwrap()).unwrap();
    let mut a = rt.instantiate(&module, 60, &[]).unwrap();
    let mut b = rt.instantiate(&module, 60, &[]).unwrap();
    let before_b = b.memory().0;
    // A writes 50 000 series (megabytes of its own linear memory).
    let mut batch = Batch::with_capacity(1024);
    for chunk in 0..50u64 {
        batch.clear();
        for i in 0..1000 {
            batch.push(chunk * 1000 + i, 1_764_000_000, 1.0);
        }
        a.put(&batch).unwrap();
    }
    let known = |_: u64| true;
    assert_eq!(a.export_state(&known).unwrap().series.len(), 50_000);
    // B sees none of it: its own store, its own memory, nothing grew.
    assert!(b.export_state(&known).unwrap().series.is_empty());
    assert!(b.flush(u64::MAX, &known).unwrap().series.is_empty());
    assert_eq!(b.memory().0, before_b);
    assert!(a.memory().0 > before_b);
    // And A keeps its data whatever B does.
    batch.clear();
    batch.push(7, 1_764_000_000, 5.0);
    b.put(&batch).unwrap();
    assert_eq!(a.export_state(&known).unwrap().series.len(), 50_000);
}

#[test]
fn the_admin_api_binds_loopback_by_default() {
    assert!(AdminConfig::default().listen.ip().is_loopback());
    let example = wagg::config::Config::from_toml(wagg::config::EXAMPLE).unwrap();
    assert!(example.admin.listen.ip().is_loopback());
}
