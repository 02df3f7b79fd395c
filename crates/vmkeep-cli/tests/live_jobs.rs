//! Several libvirt domains in one run (`backup --group G --jobs 3`, real libvirtd and QEMU
//! TCG domains), each VM on the host its `connect` names (the local host under two
//! spellings of its URI), and the host `update` and `backup` record for `status`.

#![cfg(feature = "libvirt")]

mod common;
#[path = "../../vmkeep/tests/support/libvirt.rs"]
#[allow(dead_code)]
mod lv;

use common::*;
use lv::TestVm;

/// The same host as `qemu:///system`, spelled another way.
const OTHER_SPELLING: &str = "qemu+unix:///system";

/// Append `text` to the test's config file (which holds its run and scratch folders).
fn add_config(env: &Env, text: &str) {
    let p = env.path("no-config.toml");
    let old = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, format!("{old}{text}")).unwrap();
}

/// The disk as the guest sees it now (QEMU's caches flushed to the file first).
fn disk_now(vm: &TestVm) -> Vec<u8> {
    vm.flush(0);
    let d = vm.disk("vda");
    lv::read_all(d.path.to_str().unwrap(), d.format, &vm.path("now.raw"))
}

/// `status VM --json`'s host: (uri, hostname).
fn host_of(env: &Env, vm: &str) -> (String, String) {
    let js = env.status(vm);
    let h = &js["vms"][0]["host"];
    (
        h["uri"]
            .as_str()
            .unwrap_or_else(|| panic!("{js}"))
            .to_string(),
        h["hostname"].as_str().unwrap().to_string(),
    )
}

fn this_host() -> String {
    lv::virsh(&["hostname"]).trim().to_string()
}

#[test]
fn jobs_3_over_three_domains_each_on_its_configured_uri() {
    let vms: Vec<TestVm> = (0..3)
        .map(|i| TestVm::start(&format!("jobs{i}"), &[("vda", "qcow2", 32)]))
        .collect();
    let env = Env::live();
    for (i, vm) in vms.iter().enumerate() {
        vm.guest_write(0, 0x21 + i as u8, &format!("{i}M"), "1M");
    }
    // The first VM's own connect beats the group's; the group's beats the global one. A
    // fourth member names no domain: it fails alone.
    let missing = format!("vmkeep-test-nosuch-{}", std::process::id());
    let members: Vec<String> = vms
        .iter()
        .map(|v| v.name.clone())
        .chain([missing.clone()])
        .map(|n| format!("\"{n}\""))
        .collect();
    add_config(
        &env,
        &format!(
            "connect = \"qemu:///system\"\n[groups.lv]\nvms = [{}]\nconnect = \"{OTHER_SPELLING}\"\n[vm.{}]\nconnect = \"qemu:///system\"\n",
            members.join(", "),
            vms[0].name
        ),
    );
    let out = env.run(&["--json", "backup", "--group", "lv", "--jobs", "3"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let js: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<(&str, bool)> = js["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["ok"].as_bool().unwrap()))
        .collect();
    let want: Vec<(&str, bool)> = vms
        .iter()
        .map(|v| (v.name.as_str(), true))
        .chain([(missing.as_str(), false)])
        .collect();
    assert_eq!(got, want, "{js}");
    let mut first = Vec::new();
    let host = this_host();
    for (i, vm) in vms.iter().enumerate() {
        let now = disk_now(vm);
        assert!(env.latest(&vm.name, "vda") == now, "{}: latest", vm.name);
        first.push(now);
        let uri = if i == 0 {
            "qemu:///system"
        } else {
            OTHER_SPELLING
        };
        assert_eq!(host_of(&env, &vm.name), (uri.to_string(), host.clone()));
    }
    // A second run: incremental from each domain's checkpoint, in parallel again.
    for (i, vm) in vms.iter().enumerate() {
        vm.guest_write(0, 0x41 + i as u8, "8M", "64k");
    }
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    let mut args = vec!["backup", "--jobs", "3"];
    args.extend(&names);
    let text = env.ok(&args);
    for (i, vm) in vms.iter().enumerate() {
        let d = env.newest_disk(&vm.name, "vda");
        assert_eq!(d["mode"], "incr", "{}: {text}", vm.name);
        assert!(
            env.restored(&vm.name, "1", Some("vda")) == first[i],
            "{}: -g 1",
            vm.name
        );
        assert!(
            env.restored(&vm.name, "0", Some("vda")) == disk_now(vm),
            "{}: -g 0",
            vm.name
        );
    }
    env.ok(&["check", "--all", "--deep"]);
}

#[test]
fn status_shows_the_host_of_the_newest_update_or_backup() {
    let vm = TestVm::start("host", &[("vda", "qcow2", 16)]);
    let env = Env::live();
    add_config(
        &env,
        &format!("[vm.{}]\nconnect = \"qemu:///system\"\n", vm.name),
    );
    env.ok(&["backup", &vm.name]);
    let host = this_host();
    assert_eq!(
        host_of(&env, &vm.name),
        ("qemu:///system".to_string(), host.clone())
    );
    let text = env.ok(&["status", &vm.name]);
    assert!(
        text.contains(&format!("host: {host} (qemu:///system), seen ")),
        "{text}"
    );
    // `update` through another URI sees it there: status follows the newer record.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let out = env.ok(&["update", "--connect", OTHER_SPELLING]);
    assert!(out.contains(&host), "{out}");
    let inv = std::fs::read_to_string(env.repo().join("allvm.toml")).unwrap();
    assert!(
        inv.contains(&format!("uri = \"{OTHER_SPELLING}\"")),
        "{inv}"
    );
    assert!(inv.contains(&format!("hostname = \"{host}\"")), "{inv}");
    assert_eq!(
        host_of(&env, &vm.name),
        (OTHER_SPELLING.to_string(), host.clone())
    );
    // The next backup records where it found the VM.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.ok(&["backup", &vm.name]);
    assert_eq!(
        host_of(&env, &vm.name),
        ("qemu:///system".to_string(), host.clone())
    );
    let profile = std::fs::read_to_string(env.repo().join(&vm.name).join("vm.toml")).unwrap();
    assert!(profile.contains("[host]"), "{profile}");
    env.ok(&["check", &vm.name]);
    // update with no flag asks every configured host, the default one included.
    let out = env.ok(&["update"]);
    assert!(out.contains(&vm.name), "{out}");
    // restore --as-vm: the new VM's own connect when the config gives one, else the
    // source VM's host.
    let new = format!("{}-copy", vm.name);
    add_config(
        &env,
        &format!("[vm.{new}]\nconnect = \"qemu+tcp://127.0.0.1:1/system\"\n"),
    );
    let dir = env.disk_dir();
    let e = env.fails(&restore_as_vm(&vm.name, &new, &dir), 1);
    assert!(e.contains("127.0.0.1:1"), "{e}");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "nothing written"
    );
}

/// `update` over two hosts, one of which does not answer: one warning line, exit 1, the
/// answering host's VMs recorded, the silent host's VMs kept from the last inventory.
#[test]
fn update_keeps_the_vms_of_a_host_that_does_not_answer() {
    let env = Env::live();
    let dead = "qemu+tcp://127.0.0.1:1/system";
    // The inventory of an earlier update, when the far host answered (a user in its URI
    // is dropped when recorded, so it is absent here too).
    let body = format!(
        "# vmkeep inventory (written by vmkeep; edits break the checksum)\nformat = 1\nupdated = \"2026-01-01T00:00:00Z\"\nuri = \"{dead}\"\n\n[[vm]]\nname = \"far1\"\nuuid = \"00000000-0000-0000-0000-000000000001\"\nstate = \"running\"\nuri = \"{dead}\"\nhostname = \"far.example\"\n"
    );
    let sum = blake3::hash(body.as_bytes()).to_hex();
    std::fs::write(
        env.repo().join("allvm.toml"),
        format!("{body}checksum = \"blake3:{sum}\"\n"),
    )
    .unwrap();
    add_config(
        &env,
        "connect = \"qemu:///system\"\n[vm.far1]\nconnect = \"qemu+tcp://admin@127.0.0.1:1/system\"\n",
    );
    let out = env.run(&["--json", "update"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains("127.0.0.1:1"), "{err}");
    let js: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(js["uri"], "qemu:///system", "{js}");
    let vms = js["vm"].as_array().unwrap();
    let far: Vec<&serde_json::Value> = vms.iter().filter(|v| v["name"] == "far1").collect();
    assert_eq!(far.len(), 1, "{js}");
    assert_eq!(far[0]["hostname"], "far.example");
    let host = this_host();
    assert!(
        vms.iter()
            .filter(|v| v["name"] != "far1")
            .all(|v| v["uri"] == "qemu:///system" && v["hostname"] == host.as_str()),
        "{js}"
    );
    env.ok(&["print", env.repo().join("allvm.toml").to_str().unwrap()]);
}
