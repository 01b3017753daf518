//! The triage index selects by actor-id prefix: with the campaign fixed the prefix narrows the
//! index range (a page reads only matching entries), otherwise each letter is checked; either
//! way pages with cursors return every matching letter once, in index order, and a bad
//! message (which names no actor) never matches a prefix.

use std::collections::BTreeSet;

use ferry::DeadLetterReason;
use ferry::jobs::DeadLetter;
use ferry::store::{DynStore, Txn};
use ferry::testing::{Backend, TestStore};
use ferry::triage::{self, Filter, Selection, index};

fn letter(actor: &str, campaign: &str, reason: DeadLetterReason, n: i64) -> DeadLetter {
    DeadLetter {
        actor_id: actor.into(),
        campaign: campaign.into(),
        reason,
        phase: "read".into(),
        error: "planted".into(),
        attempts: 1,
        worker: "t".into(),
        at_ms: 1_763_900_000_000 + n,
        v1_files: None,
        recovery: None,
        message: format!("{{\"n\":{n}}}"),
    }
}

async fn put(store: &DynStore, d: &DeadLetter) {
    let old = index::current(&**store, d).await.unwrap();
    let mut txn = Txn::new();
    index::put(&mut txn, old.as_deref(), d);
    store.commit(txn).await.unwrap();
}

/// Every letter of `sel`, read in pages of `size` through the cursors.
async fn paged(store: &DynStore, sel: &Selection, size: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = index::page(&**store, sel, size, after.as_deref()).await.unwrap();
        assert!(page.letters.len() <= size);
        out.extend(page.letters.iter().map(|d| d.actor_id.clone()));
        match page.next {
            Some(next) => after = Some(next),
            None => return out,
        }
    }
}

#[tokio::test]
async fn pages_by_actor_prefix_return_every_match_once_with_or_without_a_fixed_campaign() {
    let ts = TestStore::new(Backend::Sqlite).await;
    let store = ts.store();
    let journal = DeadLetterReason::JournalSidecar;
    let mut n = 0;
    for (prefix, campaign, count) in [("a-", "c1", 10), ("b-", "c1", 5), ("a-", "c2", 4), ("ab", "c1", 2)] {
        for i in 0..count {
            let name = if campaign == "c2" { format!("{prefix}2{i:02}") } else { format!("{prefix}{i:02}") };
            put(&store, &letter(&name, campaign, journal, n)).await;
            n += 1;
        }
    }
    put(&store, &letter("a-bad", "c1", DeadLetterReason::BadMessage, 99)).await;
    put(&store, &letter("a-wal", "c1", DeadLetterReason::WalSidecar, 98)).await;

    let c1_a: Vec<String> = (0..10).map(|i| format!("a-{i:02}")).collect();
    let with = |reason: Option<DeadLetterReason>, campaign: Option<&str>, prefix: &str| Selection {
        reason,
        campaign: campaign.map(String::from),
        actor_prefix: Some(prefix.into()),
    };
    // Reason and campaign fixed: the range itself is narrowed.
    assert_eq!(paged(&store, &with(Some(journal), Some("c1"), "a-"), 3).await, c1_a);
    // Campaign only (the campaign index): every reason of c1, a bad message never.
    let mut c1_any: Vec<String> = c1_a.clone();
    c1_any.push("a-wal".into());
    c1_any.sort();
    assert_eq!(paged(&store, &with(None, Some("c1"), "a-"), 4).await, c1_any);
    // Reason only: checked per letter, across campaigns.
    let got: BTreeSet<String> = paged(&store, &with(Some(journal), None, "a-"), 3).await.into_iter().collect();
    let expected: BTreeSet<String> = c1_a.iter().cloned().chain((0..4).map(|i| format!("a-2{i:02}"))).collect();
    assert_eq!(got, expected);
    // Neither: every reason, every campaign; the bad message is not an actor.
    let all = paged(&store, &with(None, None, "a-"), 5).await;
    assert_eq!(all.len(), 10 + 4 + 1, "{all:?}");
    assert!(!all.contains(&"a-bad".to_string()));
    // A longer prefix narrows further; one that matches nothing is an empty last page.
    assert_eq!(paged(&store, &with(Some(journal), Some("c1"), "ab"), 1).await, ["ab00", "ab01"]);
    assert!(paged(&store, &with(Some(journal), Some("c1"), "zz"), 3).await.is_empty());

    // The library calls the CLI and the console use: page and purge honour the prefix.
    let filter = Filter {
        reason: Some(journal),
        campaign: Some("c1".into()),
        actor_prefix: Some("b-".into()),
        ..Filter::default()
    };
    let page = triage::page(&store, &filter, 100, None).await.unwrap();
    assert_eq!(page.letters.len(), 5);
    assert_eq!(triage::purge(&store, &filter).await.unwrap(), 5);
    assert!(triage::page(&store, &filter, 100, None).await.unwrap().letters.is_empty());
    assert_eq!(triage::summary(&store).await.unwrap().dead_letters, 10 + 4 + 2 + 2);
}

#[test]
fn an_actor_prefix_is_actor_id_bytes_only() {
    for ok in ["", "a", "actor-0000", "A_b-9", &"x".repeat(64)] {
        assert!(index::check_actor_prefix(ok).is_ok(), "{ok}");
    }
    for bad in ["a/b", "~", "a b", "é", &"x".repeat(65)] {
        assert!(index::check_actor_prefix(bad).is_err(), "{bad}");
    }
}
