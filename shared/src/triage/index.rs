//! The triage index: every dead letter, in fleet and embedded mode, kept in the store where
//! triage reads it (FORMAT.md section 6).
//!
//! ```text
//! ferry/dead/{actor}                          -> JSON dead letter (one per actor: the latest)
//! ferry/dead-bad/{hash}                       -> JSON dead letter of a message with no valid actor
//! ferry/dead-reason/{reason}/{campaign}/{id}  -> u64 BE at_ms ++ u64 BE v1 bytes
//! ferry/dead-campaign/{campaign}/{id}         -> the reason
//! ```
//!
//! `{id}` is the actor id, or `~{hash}` for a bad message (`~` is no actor id byte, so the two
//! never collide); `{campaign}` is empty when a bad message named no valid campaign.
//!
//! Invariants: a record and its index entries are written and cleared in one transaction that
//! checks the record it replaces ([`put`], [`remove`]), so an index entry without its record
//! or a record without its entries is never committed; a reader that meets an entry whose
//! record changed under it (a race with a requeue or purge) skips it. A migration's finalize
//! and the skip of a migrated actor take its letter out ([`clear_on_migration`]), and
//! [`admit`] lists none over a settled head, so an actor ferry migrated is not left listed;
//! `dlq sweep` (`sweep.rs`) takes out letters listed before that, or before rivet migrated
//! their actor.
//! Reads cost what they return: pages and `show` go through the index and point reads (a
//! page's records in one batched read), `summary` reads only the index's 16-byte values.

use crate::actor::ActorId;
use crate::jobs::DeadLetter;
use crate::jobs::message::valid_campaign;
use crate::keys::{self, DEAD_PREFIX};
use crate::reason::DeadLetterReason;
use crate::store::{KeyRange, Read, ReadResult, Store, StoreError, Txn, for_each_row};
use crate::v2::head::DBHead;
use crate::v2::keys as v2keys;

/// Dead letters of messages that name no valid actor.
pub const DEAD_BAD_PREFIX: &[u8] = b"ferry/dead-bad/";
/// The index by reason, then campaign.
pub const BY_REASON_PREFIX: &[u8] = b"ferry/dead-reason/";
/// The index by campaign.
pub const BY_CAMPAIGN_PREFIX: &[u8] = b"ferry/dead-campaign/";
/// Marks a bad message's id in index keys (never an actor id byte).
const BAD_MARK: char = '~';
/// Size of an entry of the reason index.
pub const ENTRY_LEN: usize = 16;
/// Rows read per store call when walking the index.
const BATCH: usize = 1000;

/// Which record a dead letter is kept in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LetterId {
    Actor(ActorId),
    /// A bad message, by the hash of the body it kept (the same message dead-lettered twice
    /// is one record).
    Bad(String),
}

impl LetterId {
    pub fn of(d: &DeadLetter) -> LetterId {
        match ActorId::parse(&d.actor_id) {
            Ok(actor) if d.reason != DeadLetterReason::BadMessage => LetterId::Actor(actor),
            _ => LetterId::Bad(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(d.message.as_bytes()))),
        }
    }

    /// The id as index keys spell it.
    pub fn index_name(&self) -> String {
        match self {
            LetterId::Actor(a) => a.to_string(),
            LetterId::Bad(h) => format!("{BAD_MARK}{h}"),
        }
    }

    fn from_index_name(name: &[u8]) -> Option<LetterId> {
        match name.strip_prefix(BAD_MARK.to_string().as_bytes()) {
            Some(hash) if hash.len() == 16 && hash.iter().all(u8::is_ascii_hexdigit) => {
                // Checked to be ASCII hex just above.
                Some(LetterId::Bad(String::from_utf8(hash.to_vec()).expect("hex is UTF-8")))
            }
            Some(_) => None,
            None => ActorId::from_bytes(name).ok().map(LetterId::Actor),
        }
    }

    pub fn record_key(&self) -> Vec<u8> {
        match self {
            LetterId::Actor(a) => keys::dead(a),
            LetterId::Bad(h) => [DEAD_BAD_PREFIX, h.as_bytes()].concat(),
        }
    }
}

/// The campaign as index keys spell it: empty unless it is a valid name.
fn campaign_part(d: &DeadLetter) -> &str {
    if valid_campaign(&d.campaign) { &d.campaign } else { "" }
}

fn reason_key(d: &DeadLetter) -> Vec<u8> {
    let tail = format!("{}/{}/{}", d.reason.as_str(), campaign_part(d), LetterId::of(d).index_name());
    [BY_REASON_PREFIX, tail.as_bytes()].concat()
}

fn campaign_key(d: &DeadLetter) -> Option<Vec<u8>> {
    let campaign = campaign_part(d);
    if campaign.is_empty() {
        return None;
    }
    let tail = format!("{campaign}/{}", LetterId::of(d).index_name());
    Some([BY_CAMPAIGN_PREFIX, tail.as_bytes()].concat())
}

/// The reason index's value: when, and how many v1 bytes the letter saw.
fn entry(d: &DeadLetter) -> Vec<u8> {
    let bytes = d.v1_files.as_ref().map_or(0, |f| f.total());
    [d.at_ms.to_be_bytes(), bytes.to_be_bytes()].concat()
}

/// Adds to `txn` what makes `new` the dead letter of its record, replacing `old`, the raw
/// record read before (`None`: there was none). The transaction checks `old` is still there.
pub fn put(txn: &mut Txn, old: Option<&[u8]>, new: &DeadLetter) {
    let key = LetterId::of(new).record_key();
    txn.check_value(key.clone(), old.map(<[u8]>::to_vec));
    if let Some(previous) = old.and_then(DeadLetter::decode) {
        clear_entries(txn, &previous);
    }
    txn.set(key, new.encode());
    txn.set(reason_key(new), entry(new));
    if let Some(k) = campaign_key(new) {
        txn.set(k, new.reason.as_str().as_bytes().to_vec());
    }
}

/// Adds to `txn` what removes the dead letter `raw` (decoded: `d`), checking it is unchanged.
pub fn remove(txn: &mut Txn, raw: &[u8], d: &DeadLetter) {
    let key = LetterId::of(d).record_key();
    txn.check_value(key.clone(), Some(raw.to_vec()));
    txn.clear(key);
    clear_entries(txn, d);
}

/// Adds to `txn`, the transaction that makes `actor` migrated, what takes its dead letter out
/// of the index: `raw` is its record as read before (`None`: there was none), and the
/// transaction checks it is unchanged (exactly one check, whatever was read). So a migrated
/// actor never stays listed as dead: a letter written between the read and the commit (a
/// twin's last attempt giving up while this migration staged) fails the commit, and the next
/// try reads the letter and removes it.
pub fn clear_on_migration(txn: &mut Txn, actor: &ActorId, raw: Option<&[u8]>) {
    let key = keys::dead(actor);
    let Some(raw) = raw else {
        txn.check_value(key, None);
        return;
    };
    txn.check_value(key.clone(), Some(raw.to_vec()));
    txn.clear(key);
    // A record that does not decode, or names another letter, has no entries of this actor's.
    if let Some(d) = DeadLetter::decode(raw).filter(|d| LetterId::of(d) == LetterId::Actor(actor.clone())) {
        clear_entries(txn, &d);
    }
}

fn clear_entries(txn: &mut Txn, d: &DeadLetter) {
    txn.clear(reason_key(d));
    if let Some(k) = campaign_key(d) {
        txn.clear(k);
    }
}

/// One dead letter as read: its raw record (what a removal checks) and the letter.
#[derive(Clone, Debug)]
pub struct Stored {
    pub raw: Vec<u8>,
    pub letter: DeadLetter,
}

/// The dead letter kept for `id`, if any.
pub async fn get(store: &dyn Store, id: &LetterId) -> Result<Option<Stored>, StoreError> {
    Ok(store.get(&id.record_key()).await?.and_then(|raw| DeadLetter::decode(&raw).map(|letter| Stored { raw, letter })))
}

/// Records to add writing `new`: the raw record it replaces, read now.
pub async fn current(store: &dyn Store, new: &DeadLetter) -> Result<Option<Vec<u8>>, StoreError> {
    store.get(&LetterId::of(new).record_key()).await
}

/// Which dead letters a read selects.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub reason: Option<DeadLetterReason>,
    pub campaign: Option<String>,
    /// Only actors whose id starts with this (bad messages, which name no actor, never match).
    pub actor_prefix: Option<String>,
}

impl Selection {
    /// The index range that holds this selection (a cursor is relative to its start). An actor
    /// prefix narrows the range when the campaign is fixed (the id follows it in both
    /// indexes); otherwise the prefix is checked per letter.
    fn range(&self) -> KeyRange {
        let ids = self.actor_prefix.as_deref().unwrap_or("");
        let prefix = match (&self.reason, &self.campaign) {
            (Some(r), Some(c)) => [BY_REASON_PREFIX, format!("{}/{c}/{ids}", r.as_str()).as_bytes()].concat(),
            (Some(r), None) => [BY_REASON_PREFIX, format!("{}/", r.as_str()).as_bytes()].concat(),
            (None, Some(c)) => [BY_CAMPAIGN_PREFIX, format!("{c}/{ids}").as_bytes()].concat(),
            (None, None) => BY_REASON_PREFIX.to_vec(),
        };
        KeyRange::prefix(&prefix)
    }

    fn matches(&self, d: &DeadLetter) -> bool {
        self.reason.is_none_or(|r| r == d.reason)
            && self.campaign.as_ref().is_none_or(|c| c == &d.campaign)
            && self.actor_prefix.as_deref().is_none_or(|p| actor_has_prefix(d, p))
    }
}

/// Whether `d` is an actor's dead letter (not a bad message's) whose id starts with `prefix`.
pub fn actor_has_prefix(d: &DeadLetter, prefix: &str) -> bool {
    matches!(LetterId::of(d), LetterId::Actor(a) if a.as_str().starts_with(prefix))
}

/// Checks an actor prefix: at most an actor id's length of actor id bytes (`[A-Za-z0-9_-]`),
/// so it can never reach past the id in an index key.
pub fn check_actor_prefix(prefix: &str) -> Result<(), String> {
    let ok = prefix.len() <= crate::actor::MAX_ACTOR_ID_LEN
        && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if ok { Ok(()) } else { Err(format!("actor prefix {prefix:?}: at most 64 bytes of [A-Za-z0-9_-]")) }
}

/// A page of dead letters, in index order, and where the next page starts.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Page {
    pub letters: Vec<DeadLetter>,
    /// Pass as `after` to read the next page; `None` on the last page.
    pub next: Option<String>,
}

/// Up to `limit` dead letters of `sel`, after the cursor `after` (a page's `next`): one index
/// scan and one batched read of the records it names, whatever the backlog.
pub async fn page(store: &dyn Store, sel: &Selection, limit: usize, after: Option<&str>) -> Result<Page, StoreError> {
    Ok(page_stored(store, sel, limit, after).await?.into_page())
}

/// A page with each letter's raw record, for the moves that check it (requeue, purge).
#[derive(Clone, Debug, Default)]
pub struct StoredPage {
    pub stored: Vec<Stored>,
    pub next: Option<String>,
}

impl StoredPage {
    pub fn into_page(self) -> Page {
        Page { letters: self.stored.into_iter().map(|s| s.letter).collect(), next: self.next }
    }
}

/// [`page`], with the raw records.
pub async fn page_stored(
    store: &dyn Store,
    sel: &Selection,
    limit: usize,
    after: Option<&str>,
) -> Result<StoredPage, StoreError> {
    let whole = sel.range();
    let mut range = match after {
        Some(cursor) => whole.after(&[whole.start.as_slice(), cursor.as_bytes()].concat()),
        None => whole.clone(),
    };
    let mut out = StoredPage::default();
    while out.stored.len() < limit {
        let want = (limit - out.stored.len()).min(BATCH);
        let keys = store.scan_keys(&range, want).await?;
        let full = keys.len() == want;
        out.stored.extend(letters_of_index_keys(store, &keys).await?.into_iter().filter(|s| sel.matches(&s.letter)));
        let Some(last) = keys.last() else { break };
        range = range.after(last);
        // A cursor is the key relative to the selection's prefix: ASCII names and slashes.
        out.next = Some(String::from_utf8_lossy(&last[whole.start.len()..]).into_owned());
        if !full {
            out.next = None;
            break;
        }
    }
    if out.next.is_some() && store.first_key(&range).await?.is_none() {
        out.next = None;
    }
    Ok(out)
}

/// The dead letters index keys point at, in their order, each while it is still the letter
/// indexed there: an entry scanned just before its letter was replaced by one of another
/// reason or campaign points at a letter that is no longer under it, and is skipped (the new
/// letter is read at its own entry), so a read never returns a letter out of index order or
/// twice. Every record in one batched read.
async fn letters_of_index_keys(store: &dyn Store, keys: &[Vec<u8>]) -> Result<Vec<Stored>, StoreError> {
    let named: Vec<(&Vec<u8>, LetterId)> = keys
        .iter()
        .filter_map(|key| {
            let name = key.rsplit(|b| *b == b'/').next().unwrap_or_default();
            LetterId::from_index_name(name).map(|id| (key, id))
        })
        .collect();
    if named.is_empty() {
        return Ok(Vec::new());
    }
    let reads: Vec<Read> = named.iter().map(|(_, id)| Read::Get(id.record_key())).collect();
    let records = store.read_many(&reads).await?.into_iter().map(ReadResult::into_value);
    Ok(named
        .into_iter()
        .zip(records)
        .filter_map(|((key, _), raw)| {
            let raw = raw?;
            let letter = DeadLetter::decode(&raw)?;
            let indexed_here = reason_key(&letter) == *key || campaign_key(&letter).is_some_and(|k| k == *key);
            indexed_here.then_some(Stored { raw, letter })
        })
        .collect())
}

/// Calls `visit` on every dead letter of `sel`, in index order, one batch in memory at a time:
/// linear in the letters selected (requeue and purge of k letters cost k).
pub async fn each_selected(
    store: &dyn Store,
    sel: &Selection,
    mut visit: impl AsyncFnMut(Stored) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut range = sel.range();
    loop {
        let keys = store.scan_keys(&range, BATCH).await?;
        for stored in letters_of_index_keys(store, &keys).await? {
            if sel.matches(&stored.letter) {
                visit(stored).await?;
            }
        }
        match keys.last() {
            Some(last) if keys.len() == BATCH => range = range.after(last),
            _ => return Ok(()),
        }
    }
}

/// Calls `visit` on every dead letter, reading the records in key order without the index:
/// linear in the backlog with one sequential scan (what `export` needs).
pub async fn each_record(
    store: &dyn Store,
    mut visit: impl FnMut(Stored) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for prefix in [DEAD_PREFIX, DEAD_BAD_PREFIX] {
        for_each_row(store, &KeyRange::prefix(prefix), BATCH, |_, raw| match DeadLetter::decode(&raw) {
            Some(letter) => visit(Stored { raw, letter }),
            None => Ok(()),
        })
        .await?;
    }
    Ok(())
}

/// One reason and campaign's dead letters, from the index alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Group {
    pub reason: String,
    pub campaign: String,
    /// Dead letters kept (one per actor: duplicates are collapsed when they are written).
    pub count: u64,
    pub actors: u64,
    pub oldest_ms: i64,
    pub newest_ms: i64,
    pub v1_bytes: u64,
}

/// Every reason and campaign with its dead letters: one scan of the reason index, reading
/// 16 bytes per letter.
pub async fn summary(store: &dyn Store) -> Result<Vec<Group>, StoreError> {
    let mut groups: Vec<Group> = Vec::new();
    for_each_row(store, &KeyRange::prefix(BY_REASON_PREFIX), BATCH * 10, |key, value| {
        let tail = String::from_utf8_lossy(&key[BY_REASON_PREFIX.len()..]).into_owned();
        let mut parts = tail.splitn(3, '/');
        let (Some(reason), Some(campaign)) = (parts.next(), parts.next()) else { return Ok(()) };
        let (at_ms, bytes) = match <[u8; ENTRY_LEN]>::try_from(value.as_slice()) {
            // Split of a 16-byte array into two 8-byte halves.
            Ok(v) => (
                i64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
                u64::from_be_bytes(v[8..].try_into().expect("8 bytes")),
            ),
            Err(_) => (0, 0),
        };
        // Index order groups every (reason, campaign) together: only the last group can match.
        let same = groups.last().is_some_and(|g| g.reason == reason && g.campaign == campaign);
        if !same {
            groups.push(Group {
                reason: reason.to_string(),
                campaign: campaign.to_string(),
                oldest_ms: i64::MAX,
                ..Group::default()
            });
        }
        // Pushed just above when absent.
        let g = groups.last_mut().expect("a current group");
        g.count += 1;
        g.actors += 1;
        g.oldest_ms = g.oldest_ms.min(at_ms);
        g.newest_ms = g.newest_ms.max(at_ms);
        g.v1_bytes += bytes;
        Ok(())
    })
    .await?;
    Ok(groups)
}

/// What [`admit`] did with a dead letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// Written to the index.
    Listed,
    /// Its record already held a dead letter (the broker's copy of a letter ferry indexed
    /// first, or a second copy of one): nothing written.
    AlreadyListed,
    /// Its actor's v2 head is settled (migrated, or native): the migration or the runtime is
    /// the actor's outcome, and a letter would list a migrated actor as dead. Nothing written.
    ActorSettled,
}

/// Most tries of [`admit`] whose head check fails (a migration committing meanwhile).
const ADMIT_TRIES: u32 = 4;

/// Writes `d` unless its record already holds a dead letter or its actor's v2 head is settled
/// (checked in the same transaction: a finalize landing meanwhile makes it look again). For
/// dead letters that reach the index from the broker rather than from a worker's audit
/// transaction.
pub async fn admit(store: &dyn Store, d: &DeadLetter) -> Result<Admitted, StoreError> {
    let head_key = match LetterId::of(d) {
        LetterId::Actor(actor) => Some(v2keys::meta(&actor)),
        LetterId::Bad(_) => None,
    };
    let mut reads = vec![Read::Get(LetterId::of(d).record_key())];
    reads.extend(head_key.iter().map(|k| Read::Get(k.clone())));
    let mut tries = 0;
    loop {
        tries += 1;
        // The record and the head in one call.
        let mut read = store.read_many(&reads).await?.into_iter().map(ReadResult::into_value);
        if read.next().flatten().is_some() {
            return Ok(Admitted::AlreadyListed);
        }
        let mut txn = Txn::new();
        // Check 0: the record is still empty.
        put(&mut txn, None, d);
        if let Some(key) = &head_key {
            let head = read.next().flatten();
            if head.as_deref().and_then(|raw| DBHead::decode(raw).ok()).is_some_and(|h| h.is_settled()) {
                return Ok(Admitted::ActorSettled);
            }
            // Check 1: the head is still the unsettled one read.
            txn.check_value(key.clone(), head);
        }
        match store.commit(txn).await {
            Ok(()) => return Ok(Admitted::Listed),
            Err(StoreError::Conflict { index: 1, .. }) if tries < ADMIT_TRIES => continue,
            // Written by someone else since the read: it is indexed.
            Err(StoreError::Conflict { index: 0, .. }) => return Ok(Admitted::AlreadyListed),
            Err(e) => return Err(e),
        }
    }
}
