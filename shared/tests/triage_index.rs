//! The triage index contract (`triage::index`): the dead-letter records and their index entries
//! by reason and by campaign, as every backend must keep them. Each test runs on SQLite, on
//! PostgreSQL and on the rivet layout, where the index is in `X.ferry_kv` (`contract!`, as in
//! `store_contract.rs`; the index holds only ferry's records, so the actor names here stay as
//! they are on every layout); PostgreSQL must be running
//! (`ferry::testing::postgres_url()`): a test against it fails, never skips, when it is not.
//!
//! The keys are spelled out here by hand, as `triage/index.rs` documents them, so a change of
//! layout fails here and not only in a reader.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use ferry::jobs::{DeadLetter, Job};
use ferry::keys;
use ferry::migrate::{AuditRecord, OutcomeKind};
use ferry::store::{DynStore, KeyRange, KeyValue, Store, StoreError, Txn};
use ferry::triage::index::{self, Admitted, LetterId, Selection};
use ferry::triage::{self, Ticket};
use ferry::v1::V1Files;
use ferry::v2::keys as v2keys;
use ferry::v2::{DBHead, Origin};
use ferry::{ActorId, DeadLetterReason};

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let ts = ferry::testing::TestStore::new(ferry::testing::Backend::Sqlite).await;
                    super::$name(ts.store()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let ts = ferry::testing::TestStore::new(ferry::testing::Backend::Postgres).await;
                    super::$name(ts.store()).await;
                }
            )*
        }
        mod rivet {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let ts = ferry::testing::TestStore::new(ferry::testing::Backend::Rivet).await;
                    super::$name(ts.store()).await;
                }
            )*
        }
    };
}

contract!(
    put_replace_and_remove_keep_the_record_and_its_index_entries_together,
    put_and_remove_check_the_record_they_replace_and_write_nothing_when_it_changed,
    a_bad_message_is_one_record_by_its_body_with_no_campaign_entry_unless_its_campaign_is_valid,
    pages_walked_by_cursor_return_every_letter_once_in_index_order_for_every_selection,
    a_page_walk_across_concurrent_removals_returns_every_remaining_letter_once,
    a_page_never_returns_a_letter_twice_or_out_of_place_when_it_is_replaced_under_the_read,
    summary_counts_match_the_letters_per_reason_and_campaign,
    selected_and_record_walks_visit_every_letter_once,
    admit_writes_a_letter_only_when_its_record_is_empty,
    admit_does_not_list_an_actor_whose_head_is_settled,
    admit_does_not_list_an_actor_whose_migration_finalizes_while_it_admits,
    triage_summary_counts_the_letters_and_the_pending_requeue_tickets,
    sweep_removes_only_the_letters_of_settled_actors_and_records_their_skips,
    sweep_leaves_a_letter_whose_letter_head_or_audit_changed_while_it_sweeps_and_removes_the_others,
    sweep_walks_every_page_and_touches_no_actor_unsettled_or_with_a_head_that_does_not_decode,
    purge_walks_every_page_drops_only_the_selection_and_notes_each_purge_in_its_audit,
    purge_leaves_a_letter_whose_record_or_audit_changed_while_it_purges_and_drops_the_others,
);

fn id(s: &str) -> ActorId {
    ActorId::parse(s).expect("valid test actor id")
}

/// A dead letter as a worker writes it.
fn letter(actor: &str, campaign: &str, reason: DeadLetterReason, at_ms: i64, main: u64) -> DeadLetter {
    let job = Job::new(campaign, id(actor), at_ms - 10, None);
    DeadLetter {
        actor_id: actor.to_string(),
        campaign: campaign.to_string(),
        reason,
        phase: "read".into(),
        error: format!("planted {reason}"),
        attempts: 1,
        worker: "contract".into(),
        at_ms,
        v1_files: Some(V1Files { main: Some(main), journal: Some(512), wal: None, shm: None }),
        recovery: None,
        message: String::from_utf8(job.encode()).expect("job JSON is UTF-8"),
    }
}

/// Writes `d` as the worker does: reads the record it replaces, then one transaction.
async fn write(store: &dyn Store, d: &DeadLetter) -> Result<(), StoreError> {
    let old = index::current(store, d).await?;
    let mut txn = Txn::new();
    index::put(&mut txn, old.as_deref(), d);
    store.commit(txn).await
}

async fn remove(store: &dyn Store, d: &DeadLetter) {
    let stored = index::get(store, &LetterId::of(d)).await.unwrap().expect("a record to remove");
    let mut txn = Txn::new();
    index::remove(&mut txn, &stored.raw, &stored.letter);
    store.commit(txn).await.unwrap();
}

/// Every row of the triage index (records of both kinds and both index families).
async fn index_rows(store: &dyn Store) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let rows: Vec<KeyValue> = store.scan(&KeyRange::prefix(b"ferry/dead"), usize::MAX >> 1).await.unwrap();
    rows.into_iter().collect()
}

/// The rows an index holding exactly `letters` (valid actors and campaigns) must have.
fn expected_rows(letters: &[&DeadLetter]) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    for d in letters {
        let bytes = d.v1_files.as_ref().map_or(0, |f| f.total());
        out.insert(format!("ferry/dead/{}", d.actor_id).into_bytes(), d.encode());
        out.insert(
            format!("ferry/dead-reason/{}/{}/{}", d.reason.as_str(), d.campaign, d.actor_id).into_bytes(),
            [d.at_ms.to_be_bytes(), bytes.to_be_bytes()].concat(),
        );
        out.insert(
            format!("ferry/dead-campaign/{}/{}", d.campaign, d.actor_id).into_bytes(),
            d.reason.as_str().as_bytes().to_vec(),
        );
    }
    out
}

fn printable(rows: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<String> {
    rows.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect()
}

async fn assert_index_holds(store: &dyn Store, letters: &[&DeadLetter]) {
    let (got, want) = (index_rows(store).await, expected_rows(letters));
    assert_eq!(printable(&got), printable(&want), "index keys");
    assert_eq!(got, want, "index values");
}

async fn put_replace_and_remove_keep_the_record_and_its_index_entries_together(store: DynStore) {
    let a = letter("a-1", "camp-x", DeadLetterReason::JournalSidecar, 1_000, 8192);
    let b = letter("b-1", "camp-x", DeadLetterReason::WalSidecar, 2_000, 4096);
    write(&*store, &a).await.unwrap();
    write(&*store, &b).await.unwrap();
    assert_index_holds(&*store, &[&a, &b]).await;

    // The same actor dead-lettered again, with another reason and campaign: still one record,
    // and no entry of the old letter is left behind.
    let a2 = letter("a-1", "camp-y", DeadLetterReason::IntegrityCheckFailed, 3_000, 16384);
    write(&*store, &a2).await.unwrap();
    assert_index_holds(&*store, &[&a2, &b]).await;
    let got = index::get(&*store, &LetterId::Actor(id("a-1"))).await.unwrap().expect("a-1's record");
    assert_eq!(got.letter, a2);
    assert_eq!(got.raw, a2.encode(), "the raw record is what a removal checks");

    // The same letter written twice is one record with the same entries.
    write(&*store, &a2).await.unwrap();
    assert_index_holds(&*store, &[&a2, &b]).await;

    remove(&*store, &a2).await;
    assert_index_holds(&*store, &[&b]).await;
    remove(&*store, &b).await;
    assert!(index_rows(&*store).await.is_empty(), "removing every letter leaves no row");
    assert_eq!(index::get(&*store, &LetterId::Actor(id("b-1"))).await.unwrap().map(|s| s.letter), None);
}

async fn put_and_remove_check_the_record_they_replace_and_write_nothing_when_it_changed(store: DynStore) {
    let a = letter("a-1", "camp", DeadLetterReason::JournalSidecar, 1_000, 8192);
    // Two writers read "no record", then both commit: the second must lose.
    let mut first = Txn::new();
    index::put(&mut first, None, &a);
    let a2 = letter("a-1", "camp", DeadLetterReason::WalSidecar, 2_000, 8192);
    let mut second = Txn::new();
    index::put(&mut second, None, &a2);
    store.commit(first).await.unwrap();
    assert!(matches!(store.commit(second).await, Err(StoreError::Conflict { .. })), "a stale put must conflict");
    assert_index_holds(&*store, &[&a]).await;

    // A removal of a letter that was replaced since it was read writes nothing.
    let stale = index::get(&*store, &LetterId::of(&a)).await.unwrap().expect("a record");
    write(&*store, &a2).await.unwrap();
    let mut txn = Txn::new();
    index::remove(&mut txn, &stale.raw, &stale.letter);
    assert!(matches!(store.commit(txn).await, Err(StoreError::Conflict { .. })), "a stale remove must conflict");
    assert_index_holds(&*store, &[&a2]).await;
}

async fn a_bad_message_is_one_record_by_its_body_with_no_campaign_entry_unless_its_campaign_is_valid(store: DynStore) {
    let bad = |campaign: &str, body: &str, at_ms: i64| DeadLetter {
        actor_id: "not an actor!".into(),
        campaign: campaign.into(),
        reason: DeadLetterReason::BadMessage,
        phase: "parse".into(),
        error: "message is not a job".into(),
        attempts: 1,
        worker: "contract".into(),
        at_ms,
        v1_files: None,
        recovery: None,
        message: body.into(),
    };
    let first = bad("no/valid campaign", "{\"garbage\": 1}", 1_000);
    let again = bad("no/valid campaign", "{\"garbage\": 1}", 2_000);
    let other = bad("camp", "{\"garbage\": 2}", 3_000);
    for d in [&first, &again, &other] {
        write(&*store, d).await.unwrap();
    }
    let rows = index_rows(&*store).await;
    let keys: Vec<String> = printable(&rows);
    let records: Vec<&String> = keys.iter().filter(|k| k.starts_with("ferry/dead-bad/")).collect();
    assert_eq!(records.len(), 2, "the same body dead-lettered twice is one record: {keys:?}");
    let hash_of = |body: &str| format!("{:016x}", xxhash_rust::xxh3::xxh3_64(body.as_bytes()));
    let (h1, h2) = (hash_of("{\"garbage\": 1}"), hash_of("{\"garbage\": 2}"));
    let want: BTreeSet<String> = [
        format!("ferry/dead-bad/{h1}"),
        format!("ferry/dead-bad/{h2}"),
        // No valid campaign: the campaign part is empty and there is no campaign entry.
        format!("ferry/dead-reason/bad_message//~{h1}"),
        format!("ferry/dead-reason/bad_message/camp/~{h2}"),
        format!("ferry/dead-campaign/camp/~{h2}"),
    ]
    .into();
    assert_eq!(keys.into_iter().collect::<BTreeSet<_>>(), want);
    assert_eq!(rows[format!("ferry/dead-bad/{h1}").as_bytes()], again.encode(), "the latest copy is kept");

    let page = index::page(&*store, &Selection::default(), 10, None).await.unwrap();
    assert_eq!(page.letters, vec![again.clone(), other.clone()]);
    let by_reason = Selection { reason: Some(DeadLetterReason::BadMessage), campaign: None, actor_prefix: None };
    assert_eq!(index::page(&*store, &by_reason, 10, None).await.unwrap().letters.len(), 2);
    let by_campaign = Selection { reason: None, campaign: Some("camp".into()), actor_prefix: None };
    assert_eq!(index::page(&*store, &by_campaign, 10, None).await.unwrap().letters, vec![other.clone()]);

    remove(&*store, &again).await;
    remove(&*store, &other).await;
    assert!(index_rows(&*store).await.is_empty());
}

/// `n` letters over three reasons and two campaigns, with actor ids in no particular order.
fn spread(n: usize) -> Vec<DeadLetter> {
    let reasons = [DeadLetterReason::JournalSidecar, DeadLetterReason::WalSidecar, DeadLetterReason::DeliveryLimit];
    (0..n)
        .map(|i| {
            // A permutation of 0..100_003 (a prime): unique ids, written out of order.
            let actor = format!("act-{:06}", (i * 7919) % 100_003);
            let campaign = if i % 4 == 0 { "camp-b" } else { "camp-a" };
            letter(&actor, campaign, reasons[i % 3], 10_000 + i as i64, 4096 * (1 + i as u64 % 5))
        })
        .collect()
}

async fn write_all(store: &dyn Store, letters: &[DeadLetter]) {
    // Many letters per transaction, as a requeue's move would write them.
    for chunk in letters.chunks(50) {
        let mut txn = Txn::new();
        for d in chunk {
            index::put(&mut txn, None, d);
        }
        store.commit(txn).await.unwrap();
    }
}

/// The order pages return letters of `sel` in: by reason, campaign, then id (the reason
/// index), or by campaign then id (the campaign index).
fn index_order(letters: &[DeadLetter], sel: &Selection) -> Vec<DeadLetter> {
    let mut out: Vec<DeadLetter> = letters
        .iter()
        .filter(|d| sel.reason.is_none_or(|r| r == d.reason) && sel.campaign.as_ref().is_none_or(|c| *c == d.campaign))
        .cloned()
        .collect();
    if sel.reason.is_some() || sel.campaign.is_none() {
        out.sort_by(|a, b| {
            (a.reason.as_str(), &a.campaign, &a.actor_id).cmp(&(b.reason.as_str(), &b.campaign, &b.actor_id))
        });
    } else {
        out.sort_by(|a, b| (&a.campaign, &a.actor_id).cmp(&(&b.campaign, &b.actor_id)));
    }
    out
}

/// Walks every page of `sel`, `limit` at a time; `between` runs after each page.
async fn walk(
    store: &dyn Store,
    sel: &Selection,
    limit: usize,
    mut between: impl AsyncFnMut(usize),
) -> Vec<DeadLetter> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    for n in 0.. {
        let page = index::page(store, sel, limit, after.as_deref()).await.unwrap();
        assert!(page.letters.len() <= limit, "a page of {} for limit {limit}", page.letters.len());
        out.extend(page.letters);
        between(n).await;
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
        assert!(n < 10_000, "the walk does not end");
    }
    out
}

fn selections() -> Vec<Selection> {
    vec![
        Selection::default(),
        Selection { reason: Some(DeadLetterReason::WalSidecar), campaign: None, actor_prefix: None },
        Selection { reason: None, campaign: Some("camp-a".into()), actor_prefix: None },
        Selection {
            reason: Some(DeadLetterReason::DeliveryLimit),
            campaign: Some("camp-b".into()),
            actor_prefix: None,
        },
        Selection { reason: Some(DeadLetterReason::ShmSidecar), campaign: None, actor_prefix: None },
        Selection { reason: None, campaign: Some("camp".into()), actor_prefix: None },
    ]
}

async fn pages_walked_by_cursor_return_every_letter_once_in_index_order_for_every_selection(store: DynStore) {
    let letters = spread(103);
    write_all(&*store, &letters).await;
    for sel in selections() {
        let want = index_order(&letters, &sel);
        for limit in [1, 7, 34, 103, 500] {
            let got = walk(&*store, &sel, limit, async |_| {}).await;
            assert_eq!(got, want, "{sel:?}, limit {limit}");
        }
        // A page that ends exactly at the last letter says there is no next page.
        if !want.is_empty() {
            let page = index::page(&*store, &sel, want.len(), None).await.unwrap();
            assert_eq!((page.letters.len(), page.next), (want.len(), None), "{sel:?}");
        }
    }
    // A selection with nothing in it (a campaign whose name prefixes another's) is empty.
    let prefix_only = Selection { reason: None, campaign: Some("camp".into()), actor_prefix: None };
    assert!(index::page(&*store, &prefix_only, 10, None).await.unwrap().letters.is_empty());
}

async fn a_page_walk_across_concurrent_removals_returns_every_remaining_letter_once(store: DynStore) {
    let letters = spread(60);
    write_all(&*store, &letters).await;
    let sel = Selection::default();
    let order = index_order(&letters, &sel);
    // After the first page (10 letters): remove one already returned and two still ahead.
    let (behind, ahead) = (order[3].clone(), [order[25].clone(), order[47].clone()]);
    let got = walk(&*store, &sel, 10, async |n| {
        if n == 0 {
            remove(&*store, &behind).await;
            for d in &ahead {
                remove(&*store, d).await;
            }
        }
    })
    .await;
    let want: Vec<DeadLetter> = order.iter().filter(|d| !ahead.contains(d)).cloned().collect();
    assert_eq!(got, want, "every letter not removed ahead of the cursor, once, in order");

    // A removal of the very letter the cursor points at: the walk goes on after it.
    let order =
        index_order(&letters, &sel).into_iter().filter(|d| *d != behind && !ahead.contains(d)).collect::<Vec<_>>();
    let page = index::page(&*store, &sel, 5, None).await.unwrap();
    remove(&*store, &order[4]).await;
    let rest = index::page(&*store, &sel, 100, page.next.as_deref()).await.unwrap();
    assert_eq!(rest.letters, order[5..].to_vec());
}

/// A store that, once armed, runs a replacement right after the next key scan: the index
/// changes between a page's scan and its point reads.
struct ReplaceAfterScan {
    inner: DynStore,
    armed: AtomicBool,
    replacement: DeadLetter,
}

#[async_trait]
impl Store for ReplaceAfterScan {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }
    fn layout(&self) -> ferry::layout::Layout {
        self.inner.layout()
    }
    async fn v1_actors(&self, range: &KeyRange, limit: usize) -> Result<ferry::scan::ActorBatch, StoreError> {
        self.inner.v1_actors(range, limit).await
    }
    async fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.scan(range, limit).await
    }
    async fn scan_keys(&self, range: &KeyRange, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let keys = self.inner.scan_keys(range, limit).await?;
        if self.armed.swap(false, Ordering::SeqCst) {
            write(&*self.inner, &self.replacement).await?;
        }
        Ok(keys)
    }
    async fn first_key(&self, range: &KeyRange) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.first_key(range).await
    }
    async fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        self.inner.commit(txn).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

async fn a_page_never_returns_a_letter_twice_or_out_of_place_when_it_is_replaced_under_the_read(store: DynStore) {
    let letters = spread(30);
    write_all(&*store, &letters).await;
    let sel = Selection::default();
    // A page walk of 5 at a time, then one page of everything.
    for limit in [5, 1000] {
        let before = walk(&*store, &sel, 1000, async |_| {}).await;
        // The first letter in index order is dead-lettered again with a reason that sorts
        // later, after the first page scanned the keys and before it reads the records: the
        // entry it scanned points at a letter that is no longer under it.
        let victim = before[0].clone();
        let replacement = letter(&victim.actor_id, &victim.campaign, DeadLetterReason::WalSidecar, 99_999, 1);
        let racing =
            ReplaceAfterScan { inner: store.clone(), armed: AtomicBool::new(true), replacement: replacement.clone() };
        let got = walk(&racing, &sel, limit, async |_| {}).await;
        assert!(!racing.armed.load(Ordering::SeqCst), "the replacement ran");
        let actors: Vec<&str> = got.iter().map(|d| d.actor_id.as_str()).collect();
        let unique: BTreeSet<&str> = actors.iter().copied().collect();
        assert_eq!(unique.len(), actors.len(), "limit {limit}: a letter listed twice: {actors:?}");
        let place = |d: &DeadLetter| (d.reason.as_str(), d.campaign.clone(), d.actor_id.clone());
        for pair in got.windows(2) {
            assert!(
                place(&pair[0]) < place(&pair[1]),
                "limit {limit}: out of index order: {:?} before {:?}",
                place(&pair[0]),
                place(&pair[1])
            );
        }
        // Nothing else is lost: every other letter is there as it was.
        for d in before.iter().filter(|d| d.actor_id != victim.actor_id) {
            assert!(got.contains(d), "limit {limit}: {} lost", d.actor_id);
        }
        // A walk after the race sees the replacement in its place.
        let after = walk(&*store, &sel, 1000, async |_| {}).await;
        let others = before.iter().filter(|d| d.actor_id != victim.actor_id).cloned();
        assert_eq!(after, index_order(&others.chain([replacement]).collect::<Vec<_>>(), &sel), "limit {limit}");
    }
}

async fn summary_counts_match_the_letters_per_reason_and_campaign(store: DynStore) {
    assert!(index::summary(&*store).await.unwrap().is_empty(), "an empty index has no group");
    let mut letters = spread(77);
    write_all(&*store, &letters).await;
    // A replacement moves a letter from one group to another; a removal drops it.
    let moved = letter(&letters[1].actor_id, "camp-b", DeadLetterReason::JournalSidecar, 50_000, 1 << 20);
    write(&*store, &moved).await.unwrap();
    letters[1] = moved;
    let dropped = letters.remove(2);
    remove(&*store, &dropped).await;

    let mut want: BTreeMap<(String, String), index::Group> = BTreeMap::new();
    for d in &letters {
        let g = want.entry((d.reason.as_str().to_string(), d.campaign.clone())).or_insert_with(|| index::Group {
            reason: d.reason.as_str().to_string(),
            campaign: d.campaign.clone(),
            oldest_ms: i64::MAX,
            ..index::Group::default()
        });
        g.count += 1;
        g.actors += 1;
        g.oldest_ms = g.oldest_ms.min(d.at_ms);
        g.newest_ms = g.newest_ms.max(d.at_ms);
        g.v1_bytes += d.v1_files.as_ref().map_or(0, |f| f.total());
    }
    let got = index::summary(&*store).await.unwrap();
    assert_eq!(got, want.into_values().collect::<Vec<_>>(), "groups in index order with their counts");
    assert_eq!(got.iter().map(|g| g.count).sum::<u64>(), letters.len() as u64);
}

async fn selected_and_record_walks_visit_every_letter_once(store: DynStore) {
    let letters = spread(1203);
    write_all(&*store, &letters).await;
    for sel in selections() {
        let mut seen = Vec::new();
        index::each_selected(&*store, &sel, async |s| {
            seen.push(s.letter);
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(seen, index_order(&letters, &sel), "{sel:?}");
    }
    let mut records = Vec::new();
    index::each_record(&*store, |s| {
        assert_eq!(s.raw, s.letter.encode());
        records.push(s.letter);
        Ok(())
    })
    .await
    .unwrap();
    let mut want = letters.clone();
    want.sort_by(|a, b| a.actor_id.cmp(&b.actor_id));
    assert_eq!(records, want, "one sequential pass over the records, in actor order");
}

async fn admit_writes_a_letter_only_when_its_record_is_empty(store: DynStore) {
    let indexed = letter("a-1", "camp", DeadLetterReason::JournalSidecar, 1_000, 8192);
    write(&*store, &indexed).await.unwrap();
    // The broker's copy of a letter the worker indexed first changes nothing.
    let copy = letter("a-1", "camp", DeadLetterReason::DeliveryLimit, 2_000, 0);
    assert_eq!(index::admit(&*store, &copy).await.unwrap(), Admitted::AlreadyListed);
    let fresh = letter("b-1", "camp", DeadLetterReason::DeliveryLimit, 3_000, 0);
    assert_eq!(index::admit(&*store, &fresh).await.unwrap(), Admitted::Listed);
    assert_eq!(
        index::admit(&*store, &fresh).await.unwrap(),
        Admitted::AlreadyListed,
        "a second copy is not written again"
    );
    assert_index_holds(&*store, &[&indexed, &fresh]).await;
}

async fn admit_does_not_list_an_actor_whose_head_is_settled(store: DynStore) {
    // The broker dead-lettered a job at its delivery limit while a twin migrated the actor;
    // a native actor likewise. A migration in progress does not settle it. (Heads are v2
    // keys: the actors must be the layout's own.)
    let mut listed = Vec::new();
    for (name, origin, admitted) in [
        ("m-1", Origin::MigratedFromV1, Admitted::ActorSettled),
        ("n-1", Origin::Native, Admitted::ActorSettled),
        ("s-1", Origin::MigratingFromV1, Admitted::Listed),
    ] {
        let actor = ferry::testing::actor_for(store.layout(), name);
        let mut txn = Txn::new();
        txn.set(v2keys::meta(&actor), DBHead { origin, ..DBHead::staging(1, 1, 1) }.encode());
        store.commit(txn).await.unwrap();
        let d = letter(&actor.to_string(), "camp", DeadLetterReason::DeliveryLimit, 1_000, 0);
        assert_eq!(index::admit(&*store, &d).await.unwrap(), admitted, "{origin:?}");
        if admitted == Admitted::Listed {
            listed.push(d);
        }
    }
    assert_index_holds(&*store, &listed.iter().collect::<Vec<_>>()).await;
}

/// A store that commits `first` (once) just before the next commit asked of it: another
/// writer landing between a reader's reads and its commit.
struct CommitsFirst {
    inner: DynStore,
    first: tokio::sync::Mutex<Option<Txn>>,
}

#[async_trait]
impl Store for CommitsFirst {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }
    fn layout(&self) -> ferry::layout::Layout {
        self.inner.layout()
    }
    async fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.scan(range, limit).await
    }
    async fn first_key(&self, range: &KeyRange) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.first_key(range).await
    }
    async fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        if let Some(first) = self.first.lock().await.take() {
            self.inner.commit(first).await?;
        }
        self.inner.commit(txn).await
    }
    async fn commit_many(&self, txns: Vec<Txn>) -> Vec<Result<(), StoreError>> {
        if let Some(first) = self.first.lock().await.take()
            && let Err(e) = self.inner.commit(first).await
        {
            return txns.iter().map(|_| Err(e.clone())).collect();
        }
        self.inner.commit_many(txns).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

async fn admit_does_not_list_an_actor_whose_migration_finalizes_while_it_admits(store: DynStore) {
    let actor = ferry::testing::actor_for(store.layout(), "f-1");
    let staging = DBHead::staging(1, 1, 1);
    let mut txn = Txn::new();
    txn.set(v2keys::meta(&actor), staging.encode());
    store.commit(txn).await.unwrap();
    // The twin's finalize lands after admit read the staging head, before admit commits.
    let mut finalize = Txn::new();
    finalize.set(v2keys::meta(&actor), DBHead { origin: Origin::MigratedFromV1, ..staging }.encode());
    let racing: DynStore =
        Arc::new(CommitsFirst { inner: store.clone(), first: tokio::sync::Mutex::new(Some(finalize)) });
    let d = letter(&actor.to_string(), "camp", DeadLetterReason::DeliveryLimit, 1_000, 0);
    assert_eq!(index::admit(&*racing, &d).await.unwrap(), Admitted::ActorSettled);
    assert_index_holds(&*store, &[]).await;
}

async fn triage_summary_counts_the_letters_and_the_pending_requeue_tickets(store: DynStore) {
    let letters = spread(40);
    write_all(&*store, &letters).await;
    // Three letters moved to tickets, as a requeue does: record and entries cleared, ticket
    // written, in one transaction.
    let mut txn = Txn::new();
    for d in &letters[..3] {
        let stored = index::get(&*store, &LetterId::of(d)).await.unwrap().unwrap();
        index::remove(&mut txn, &stored.raw, &stored.letter);
        txn.set(triage::ticket::key(&id(&d.actor_id)), Ticket::new(d.clone(), None, 5).encode());
    }
    store.commit(txn).await.unwrap();
    let summary = triage::summary(&store).await.unwrap();
    assert_eq!(summary.dead_letters, 37);
    assert_eq!(summary.requeues_pending, 3);
    assert_eq!(summary.groups.iter().map(|g| g.count).sum::<u64>(), 37);
    for d in &letters[..3] {
        let state = triage::show(&store, &id(&d.actor_id)).await.unwrap();
        assert!(state.dead_letters.is_empty(), "{}: moved out of the index", d.actor_id);
        assert_eq!(
            state.requeue.map(|t| t.dead_letter),
            Some(d.clone()),
            "{}: its ticket keeps the letter",
            d.actor_id
        );
    }
    let state = triage::show(&store, &id(&letters[3].actor_id)).await.unwrap();
    assert_eq!((state.dead_letters, state.requeue), (vec![letters[3].clone()], None));
}

/// Sets `actor`'s v2 head to one of `origin` and returns it.
async fn set_head(store: &dyn Store, actor: &ActorId, origin: Origin) -> DBHead {
    let head = DBHead { origin, ..DBHead::staging(3, 7, 1) };
    let mut txn = Txn::new();
    txn.set(v2keys::meta(actor), head.encode());
    store.commit(txn).await.unwrap();
    head
}

/// Writes `audit` as `actor`'s audit record and returns its bytes.
async fn set_audit(store: &dyn Store, audit: &AuditRecord) -> Vec<u8> {
    let mut txn = Txn::new();
    txn.set(keys::audit(&audit.actor_id), audit.encode());
    store.commit(txn).await.unwrap();
    audit.encode()
}

async fn audit_of(store: &dyn Store, actor: &ActorId) -> Option<AuditRecord> {
    store.get(&keys::audit(actor)).await.unwrap().and_then(|raw| AuditRecord::decode(&raw))
}

async fn sweep_removes_only_the_letters_of_settled_actors_and_records_their_skips(store: DynStore) {
    let actor = |name| ferry::testing::actor_for(store.layout(), name);
    let (gave_up, migrated, native, staging, none, skipped) =
        (actor("r-1"), actor("k-1"), actor("n-1"), actor("s-1"), actor("x-1"), actor("n-2"));
    let letters: Vec<DeadLetter> = [&gave_up, &migrated, &native, &staging, &none, &skipped]
        .iter()
        .enumerate()
        .map(|(i, a)| letter(&a.to_string(), "camp", DeadLetterReason::JournalSidecar, 1_000 + i as i64, 4096))
        .collect();
    write_all(&*store, &letters).await;
    // r-1: ferry gave up on it, then rivet's own migration finished it (its audit says dead);
    // k-1: an older ferry left a twin's letter beside the migration its audit records;
    // n-1: native; s-1: a migration in progress; x-1: no v2 at all; n-2: native, its skip
    // already recorded by an older ferry's job that did not take the letter out.
    let rivet_head = set_head(&*store, &gave_up, Origin::MigratedFromV1).await;
    set_audit(&*store, &letters[0].audit(&gave_up, 1_000)).await;
    let ferry_head = set_head(&*store, &migrated, Origin::MigratedFromV1).await;
    let migration = AuditRecord::skipped(&migrated, "camp", OutcomeKind::Migrated, Some(&ferry_head), "w", (5, 9));
    let migration_raw = set_audit(&*store, &migration).await;
    set_head(&*store, &native, Origin::Native).await;
    set_head(&*store, &staging, Origin::MigratingFromV1).await;
    let staging_audit = set_audit(&*store, &letters[3].audit(&staging, 1_003)).await;
    let native_head = set_head(&*store, &skipped, Origin::Native).await;
    let native_skip =
        AuditRecord::skipped(&skipped, "camp", OutcomeKind::SkippedNativeV2, Some(&native_head), "w", (6, 7));
    let native_skip_raw = set_audit(&*store, &native_skip).await;

    let dry = triage::sweep(&store, &triage::Filter::default(), true, "sweeper").await.unwrap();
    assert_eq!(
        dry,
        triage::Swept { checked: 6, migrated: 2, native: 2, changed: 0, dry_run: true },
        "a dry run counts what it would remove"
    );
    assert_index_holds(&*store, &letters.iter().collect::<Vec<_>>()).await;
    assert_eq!(audit_of(&*store, &gave_up).await.map(|a| a.outcome), Some(OutcomeKind::DeadLettered), "dry: unwritten");

    let swept = triage::sweep(&store, &triage::Filter::default(), false, "sweeper").await.unwrap();
    assert_eq!(swept, triage::Swept { checked: 6, migrated: 2, native: 2, changed: 0, dry_run: false });
    assert_index_holds(&*store, &[&letters[3], &letters[4]]).await;
    let skip = audit_of(&*store, &gave_up).await.expect("r-1's audit");
    assert_eq!(
        (skip.outcome, skip.generation, skip.pages, skip.worker.as_str(), skip.campaign.as_str()),
        (
            OutcomeKind::SkippedAlreadyMigrated,
            Some(rivet_head.generation),
            Some(rivet_head.db_size_pages),
            "sweeper",
            "camp"
        ),
        "the skip a job would record, from the head"
    );
    assert_eq!(
        store.get(&keys::audit(&migrated)).await.unwrap(),
        Some(migration_raw),
        "the migration's own audit is kept as it is"
    );
    assert_eq!(audit_of(&*store, &native).await.map(|a| a.outcome), Some(OutcomeKind::SkippedNativeV2));
    assert_eq!(store.get(&keys::audit(&skipped)).await.unwrap(), Some(native_skip_raw), "n-2's skip kept");
    assert_eq!(store.get(&keys::audit(&staging)).await.unwrap(), Some(staging_audit), "s-1 untouched");
    assert_eq!(audit_of(&*store, &none).await, None, "x-1 untouched");

    let again = triage::sweep(&store, &triage::Filter::default(), false, "sweeper").await.unwrap();
    assert_eq!((again.checked, again.removed()), (2, 0), "nothing left to remove");
    // A filter selects as the other moves do: nothing of another campaign.
    let other = triage::Filter { campaign: Some("other".into()), ..triage::Filter::default() };
    assert_eq!(triage::sweep(&store, &other, false, "sweeper").await.unwrap().checked, 0);
}

async fn sweep_leaves_a_letter_whose_letter_head_or_audit_changed_while_it_sweeps_and_removes_the_others(
    store: DynStore,
) {
    let actor = |name| ferry::testing::actor_for(store.layout(), name);
    let actors = [actor("q-1"), actor("q-2"), actor("q-3"), actor("q-4"), actor("q-5")];
    let letters: Vec<DeadLetter> =
        actors.iter().map(|a| letter(&a.to_string(), "camp", DeadLetterReason::DeliveryLimit, 2_000, 0)).collect();
    write_all(&*store, &letters).await;
    for a in &actors {
        set_head(&*store, a, Origin::MigratedFromV1).await;
    }
    // After the sweep read them, before it commits: an operator's requeue moves q-2's letter
    // to a ticket (check 0), q-3's head is rewritten as a migration in progress (check 1), and
    // a job records q-4's skip (check 2).
    let stored = index::get(&*store, &LetterId::of(&letters[1])).await.unwrap().unwrap();
    let mut meanwhile = Txn::new();
    index::remove(&mut meanwhile, &stored.raw, &stored.letter);
    let ticket = Ticket::new(letters[1].clone(), None, 5);
    meanwhile.set(triage::ticket::key(&actors[1]), ticket.encode());
    let restaged = DBHead { origin: Origin::MigratingFromV1, ..DBHead::staging(9, 9, 2) };
    meanwhile.set(v2keys::meta(&actors[2]), restaged.encode());
    let job_skip = AuditRecord::skipped(&actors[3], "camp", OutcomeKind::SkippedAlreadyMigrated, None, "job", (8, 9));
    meanwhile.set(keys::audit(&actors[3]), job_skip.encode());
    let racing: DynStore =
        Arc::new(CommitsFirst { inner: store.clone(), first: tokio::sync::Mutex::new(Some(meanwhile)) });
    let swept = triage::sweep(&racing, &triage::Filter::default(), false, "sweeper").await.unwrap();
    assert_eq!(swept, triage::Swept { checked: 5, migrated: 2, native: 0, changed: 3, dry_run: false });
    assert_index_holds(&*store, &[&letters[2], &letters[3]]).await;
    assert_eq!(
        store.get(&triage::ticket::key(&actors[1])).await.unwrap(),
        Some(ticket.encode()),
        "the requeue's ticket stands"
    );
    assert_eq!(audit_of(&*store, &actors[1]).await, None, "q-2's audit is its requeue's to write");
    assert_eq!(audit_of(&*store, &actors[2]).await, None, "q-3: the migration in progress is left alone");
    assert_eq!(audit_of(&*store, &actors[3]).await, Some(job_skip), "q-4: the job's audit stands");
    for a in [&actors[0], &actors[4]] {
        assert_eq!(audit_of(&*store, a).await.map(|r| r.outcome), Some(OutcomeKind::SkippedAlreadyMigrated), "{a}");
    }
}

async fn sweep_walks_every_page_and_touches_no_actor_unsettled_or_with_a_head_that_does_not_decode(store: DynStore) {
    // More letters than one page of a move (500), every third actor settled, every seventh
    // of the others with a head that does not decode (its own dead letter stands).
    let n = 1_100;
    let actors: Vec<ActorId> =
        (0..n).map(|i| ferry::testing::actor_for(store.layout(), &format!("p-{i:04}"))).collect();
    let letters: Vec<DeadLetter> = actors
        .iter()
        .enumerate()
        .map(|(i, a)| letter(&a.to_string(), "camp", DeadLetterReason::JournalSidecar, 3_000 + i as i64, 0))
        .collect();
    write_all(&*store, &letters).await;
    let settled = DBHead { origin: Origin::MigratedFromV1, ..DBHead::staging(1, 1, 1) };
    for chunk in actors.iter().enumerate().collect::<Vec<_>>().chunks(100) {
        let mut txn = Txn::new();
        for (i, a) in chunk {
            if i % 3 == 0 {
                txn.set(v2keys::meta(a), settled.encode());
            } else if i % 7 == 0 {
                txn.set(v2keys::meta(a), b"not a head".to_vec());
            }
        }
        store.commit(txn).await.unwrap();
    }
    let swept = triage::sweep(&store, &triage::Filter::default(), false, "sweeper").await.unwrap();
    let removed = (0..n).filter(|i| i % 3 == 0).count() as u64;
    assert_eq!(swept, triage::Swept { checked: n as u64, migrated: removed, native: 0, changed: 0, dry_run: false });
    let left: Vec<&DeadLetter> = letters.iter().enumerate().filter(|(i, _)| i % 3 != 0).map(|(_, d)| d).collect();
    assert_index_holds(&*store, &left).await;
    let again = triage::sweep(&store, &triage::Filter::default(), false, "sweeper").await.unwrap();
    assert_eq!((again.checked, again.removed()), (left.len() as u64, 0));
}

async fn purge_walks_every_page_drops_only_the_selection_and_notes_each_purge_in_its_audit(store: DynStore) {
    // More letters than one page of a move (500), in groups of many commits each: every other
    // one journal_sidecar (the selection), the rest delivery_limit; every fifth actor already
    // has an audit record (of its dead letter), whose fields the purge keeps.
    let n = 1_100;
    let actors: Vec<ActorId> =
        (0..n).map(|i| ferry::testing::actor_for(store.layout(), &format!("g-{i:04}"))).collect();
    let reason =
        |i: usize| if i.is_multiple_of(2) { DeadLetterReason::JournalSidecar } else { DeadLetterReason::DeliveryLimit };
    let letters: Vec<DeadLetter> = actors
        .iter()
        .enumerate()
        .map(|(i, a)| letter(&a.to_string(), "camp", reason(i), 4_000 + i as i64, 0))
        .collect();
    write_all(&*store, &letters).await;
    let mut earlier = BTreeMap::new();
    for (i, d) in letters.iter().enumerate().filter(|(i, _)| i % 5 == 0) {
        let mut audit = d.audit(&actors[i], 1);
        audit.worker = format!("worker-{i}");
        set_audit(&*store, &audit).await;
        earlier.insert(i, audit);
    }
    // And a bad message, purged with its own selection: no actor, so no audit.
    let bad = DeadLetter {
        actor_id: "not an actor!".into(),
        reason: DeadLetterReason::BadMessage,
        message: "{\"garbage\": 3}".into(),
        ..letter("g-0000", "camp", DeadLetterReason::BadMessage, 3_999, 0)
    };
    write_all(&*store, std::slice::from_ref(&bad)).await;
    let bad_only = triage::Filter { reason: Some(DeadLetterReason::BadMessage), ..triage::Filter::default() };
    assert_eq!(triage::purge(&store, &bad_only).await.unwrap(), 1);
    let filter = triage::Filter { reason: Some(DeadLetterReason::JournalSidecar), ..triage::Filter::default() };
    let purged = triage::purge(&store, &filter).await.unwrap();
    assert_eq!(purged, (n / 2) as u64);
    let left: Vec<&DeadLetter> = letters.iter().enumerate().filter(|(i, _)| i % 2 == 1).map(|(_, d)| d).collect();
    assert_index_holds(&*store, &left).await;
    for (i, a) in actors.iter().enumerate() {
        let audit = audit_of(&*store, a).await;
        if i % 2 == 1 {
            assert_eq!(audit, earlier.get(&i).cloned(), "{a}: not selected, not touched");
            continue;
        }
        let audit = audit.unwrap_or_else(|| panic!("{a}: no audit noting the purge"));
        assert!(audit.purged_at_ms.is_some(), "{a}: the purge is not noted");
        let kept = earlier.get(&i).cloned().unwrap_or_else(|| letters[i].audit(a, letters[i].at_ms));
        assert_eq!(AuditRecord { purged_at_ms: None, ..audit }, kept, "{a}: the record's other fields");
    }
    assert_eq!(triage::purge(&store, &filter).await.unwrap(), 0, "nothing left to purge");
}

async fn purge_leaves_a_letter_whose_record_or_audit_changed_while_it_purges_and_drops_the_others(store: DynStore) {
    let actor = |name| ferry::testing::actor_for(store.layout(), name);
    let actors = [actor("u-1"), actor("u-2"), actor("u-3"), actor("u-4")];
    let letters: Vec<DeadLetter> =
        actors.iter().map(|a| letter(&a.to_string(), "camp", DeadLetterReason::WalSidecar, 5_000, 0)).collect();
    write_all(&*store, &letters).await;
    // After the purge read them, before it commits: an operator's requeue moves u-2's letter
    // to a ticket, and a job records u-3's migration in its audit.
    let stored = index::get(&*store, &LetterId::of(&letters[1])).await.unwrap().unwrap();
    let mut meanwhile = Txn::new();
    index::remove(&mut meanwhile, &stored.raw, &stored.letter);
    let ticket = Ticket::new(letters[1].clone(), None, 5);
    meanwhile.set(triage::ticket::key(&actors[1]), ticket.encode());
    let job = AuditRecord::skipped(&actors[2], "camp", OutcomeKind::SkippedNoV1, None, "job", (8, 9));
    meanwhile.set(keys::audit(&actors[2]), job.encode());
    let racing: DynStore =
        Arc::new(CommitsFirst { inner: store.clone(), first: tokio::sync::Mutex::new(Some(meanwhile)) });
    assert_eq!(triage::purge(&racing, &triage::Filter::default()).await.unwrap(), 2);
    assert_index_holds(&*store, &[&letters[2]]).await;
    assert_eq!(store.get(&triage::ticket::key(&actors[1])).await.unwrap(), Some(ticket.encode()), "the ticket stands");
    assert_eq!(audit_of(&*store, &actors[1]).await, None, "u-2's audit is its requeue's to write");
    assert_eq!(audit_of(&*store, &actors[2]).await, Some(job), "u-3: the job's audit stands");
    for a in [&actors[0], &actors[3]] {
        assert!(audit_of(&*store, a).await.is_some_and(|r| r.purged_at_ms.is_some()), "{a}: not purged");
    }
}
