//! Address handles, one per (GID, flow label, traffic class, service level).
//!
//! Creating an address handle on RoCE resolves the destination MAC through the
//! kernel, far too slow per probe; a prober re-uses the same few hundred
//! (targets x flow labels) continuously, so they are cached. The cache is
//! bounded: beyond its capacity the least recently used handle is evicted and
//! handed back to the caller to destroy (the caller may have to wait until no
//! send that used it is still outstanding).

use std::collections::HashMap;

use super::gid::Gid;

/// Handles kept by default: 64 flow labels for 64 targets.
pub const DEFAULT_CAPACITY: usize = 4_096;

/// What makes two address handles interchangeable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AhKey {
    pub gid: Gid,
    pub flow_label: u32,
    pub traffic_class: u8,
    pub service_level: u8,
}

/// A bounded LRU cache of address handles of type `H`.
#[derive(Debug)]
pub struct AhCache<H> {
    entries: HashMap<AhKey, Slot<H>>,
    capacity: usize,
    tick: u64,
    hits: u64,
    misses: u64,
}

#[derive(Debug)]
struct Slot<H> {
    handle: H,
    last_used: u64,
}

/// The result of a lookup: the handle to use, and a handle evicted to make
/// room for it (which the caller must destroy).
#[derive(Debug)]
pub struct Lookup<'a, H> {
    pub handle: &'a H,
    pub evicted: Option<H>,
    pub created: bool,
}

impl<H> AhCache<H> {
    /// A cache of at most `capacity` handles (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            tick: 0,
            hits: 0,
            misses: 0,
        }
    }

    /// The handle for `key`, created by `create` on a miss. A failed create
    /// leaves the cache unchanged.
    pub fn get_or_create<E>(
        &mut self,
        key: &AhKey,
        create: impl FnOnce(&AhKey) -> Result<H, E>,
    ) -> Result<Lookup<'_, H>, E> {
        self.tick += 1;
        let tick = self.tick;
        let mut evicted = None;
        let created = !self.entries.contains_key(key);
        if created {
            let handle = create(key)?;
            self.misses += 1;
            if self.entries.len() >= self.capacity {
                evicted = self.evict_least_recently_used();
            }
            self.entries.insert(
                *key,
                Slot {
                    handle,
                    last_used: tick,
                },
            );
        } else {
            self.hits += 1;
        }
        let Some(slot) = self.entries.get_mut(key) else {
            unreachable!("the key was present or has just been inserted")
        };
        slot.last_used = tick;
        Ok(Lookup {
            handle: &slot.handle,
            evicted,
            created,
        })
    }

    /// Handles cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Lookups served from the cache and lookups that created a handle.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    /// Empties the cache, handing every handle back for destruction.
    pub fn drain(&mut self) -> Vec<H> {
        self.entries.drain().map(|(_, slot)| slot.handle).collect()
    }

    fn evict_least_recently_used(&mut self) -> Option<H> {
        let oldest = *self
            .entries
            .iter()
            .min_by_key(|(_, slot)| slot.last_used)?
            .0;
        self.entries.remove(&oldest).map(|slot| slot.handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(label: u32) -> AhKey {
        AhKey {
            gid: Gid::from_ipv4([10, 0, 0, 1]),
            flow_label: label,
            traffic_class: 0,
            service_level: 0,
        }
    }

    #[allow(clippy::unnecessary_wraps)] // the shape get_or_create takes
    fn create(k: &AhKey) -> Result<u32, ()> {
        Ok(k.flow_label)
    }

    #[test]
    fn a_second_lookup_of_a_key_is_a_hit_and_creates_nothing() {
        let mut cache = AhCache::new(4);
        assert!(cache.get_or_create(&key(1), create).unwrap().created);
        let again = cache
            .get_or_create(&key(1), |_| -> Result<u32, ()> {
                panic!("must not create")
            })
            .unwrap();
        assert!(!again.created);
        assert_eq!(*again.handle, 1);
        assert_eq!(cache.hits_and_misses(), (1, 1));
    }

    #[test]
    fn keys_differing_only_in_traffic_class_get_their_own_handles() {
        let mut cache = AhCache::new(4);
        cache.get_or_create(&key(1), create).unwrap();
        let other = AhKey {
            traffic_class: 0x60,
            ..key(1)
        };
        assert!(cache.get_or_create(&other, create).unwrap().created);
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_full_cache_evicts_the_least_recently_used_handle_for_destruction() {
        let mut cache = AhCache::new(2);
        cache.get_or_create(&key(1), create).unwrap();
        cache.get_or_create(&key(2), create).unwrap();
        cache.get_or_create(&key(1), create).unwrap(); // 2 is now the oldest
        let lookup = cache.get_or_create(&key(3), create).unwrap();
        assert_eq!(lookup.evicted, Some(2));
        assert_eq!(cache.len(), 2);
        assert!(!cache.get_or_create(&key(1), create).unwrap().created);
        assert!(cache.get_or_create(&key(2), create).unwrap().created);
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity() {
        let mut cache = AhCache::new(8);
        let mut evicted = 0;
        for label in 0..100 {
            evicted += usize::from(
                cache
                    .get_or_create(&key(label), create)
                    .unwrap()
                    .evicted
                    .is_some(),
            );
            assert!(cache.len() <= 8);
        }
        assert_eq!(evicted, 92);
        let mut rest = cache.drain();
        rest.sort_unstable();
        assert_eq!(rest, (92..100).collect::<Vec<u32>>());
        assert!(cache.is_empty());
    }

    #[test]
    fn a_failed_create_leaves_the_cache_unchanged() {
        let mut cache: AhCache<u32> = AhCache::new(1);
        cache.get_or_create(&key(1), create).unwrap();
        assert_eq!(
            cache
                .get_or_create(&key(2), |_| Err("no route"))
                .unwrap_err(),
            "no route"
        );
        assert_eq!(cache.len(), 1);
        assert!(!cache.get_or_create(&key(1), create).unwrap().created);
    }
}
