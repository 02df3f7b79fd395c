//! Offsite copies in a folder target (`file:///PATH`, the encrypted object layout): the
//! cases of `offsite_cases` (sync, restore every generation bit for bit, deduplication,
//! a sync killed halfway and resumed, `check --from` finding damage, wrong or missing
//! keys, no plaintext, prune from the target), and a replica repository (`sync --to PATH`).

mod common;
#[path = "../../vmkeep/tests/support/garage.rs"]
#[allow(dead_code)]
mod garage;
mod offsite_cases;

use common::*;
use offsite_cases::{ten_generations, Backend, VM};

#[test]
fn ten_generations_sync_and_every_one_restores_bit_for_bit_from_the_target() {
    offsite_cases::ten_generations_sync_and_every_one_restores_bit_for_bit_from_the_target(
        &Backend::Folder,
    );
}

#[test]
fn the_target_holds_no_plaintext_block_digest_or_vm_name() {
    offsite_cases::the_target_holds_no_plaintext_block_digest_or_vm_name(&Backend::Folder);
}

#[test]
fn two_vms_cloned_from_one_image_share_their_blocks() {
    offsite_cases::two_vms_cloned_from_one_image_share_their_blocks(&Backend::Folder);
}

#[test]
fn limit_rate_bounds_the_upload_rate() {
    offsite_cases::limit_rate_bounds_the_upload_rate(&Backend::Folder);
}

#[test]
fn without_the_key_or_with_a_wrong_key_one_clear_error_and_nothing_is_read() {
    offsite_cases::without_the_key_or_with_a_wrong_key_one_clear_error_and_nothing_is_read(
        &Backend::Folder,
    );
}

#[test]
fn check_from_finds_a_flipped_byte_in_a_pack_a_deleted_pack_and_a_forged_manifest() {
    offsite_cases::check_from_finds_a_flipped_byte_in_a_pack_a_deleted_pack_and_a_forged_manifest(
        &Backend::Folder,
    );
}

#[test]
fn prune_from_the_target_then_what_remains_restores() {
    offsite_cases::prune_from_the_target_then_what_remains_restores(&Backend::Folder);
}

#[cfg(feature = "fault-injection")]
#[test]
fn a_sync_killed_halfway_resumes_and_uploads_little_twice() {
    offsite_cases::a_sync_killed_halfway_resumes_and_uploads_little_twice(&Backend::Folder);
}

/// `sync --to PATH` (a plain path): a replica repository, made by the first sync, that
/// restores every generation bit for bit like the local one and passes a deep check on
/// its own; a second sync copies nothing; no key is needed (it is not encrypted).
#[test]
fn a_sync_to_a_second_repository_path_makes_a_replica_that_stands_on_its_own() {
    let env = Env::new();
    let gens = ten_generations(&env, VM);
    let replica = env.path("second-disk/replica");
    let out = env.ok(&["sync", VM, "--to", replica.to_str().unwrap()]);
    assert!(out.contains("10 generations copied"), "{out}");
    let run_there = |args: &[&str]| env.run_at(&replica, args, &[]);
    let deep = run_there(&["check", VM, "--deep"]);
    assert!(deep.status.success(), "{}", stderr(&deep));
    for g in &gens {
        for d in ["vda", "vdb"] {
            let local = env.restored(VM, g, Some(d));
            let there = env
                .restored_at(&replica, VM, g, Some(d))
                .unwrap_or_else(|e| panic!("restore {g} {d} from the replica: {e}"));
            assert!(local == there, "generation {g} disk {d} differs");
        }
    }
    // Its newest image is the plain raw image of the newest generation.
    let latest = std::fs::read(replica.join(VM).join("latest/vda.raw")).unwrap();
    assert!(latest == env.restored(VM, "latest", Some("vda")));
    let again = env.ok(&["sync", VM, "--to", replica.to_str().unwrap()]);
    assert!(
        again.contains("0 generations copied") && again.contains("10 already there"),
        "{again}"
    );
    // The repository itself is refused as its own replica.
    let e = env.fails(&["sync", VM, "--to", env.repo().to_str().unwrap()], 2);
    assert!(e.contains("is the repository itself"), "{e}");
}
