//! The `PingMesh` watch that tells `/readyz` when the cache has synced.
//!
//! kube-runtime's `Store::wait_until_ready` cannot be shared: every store
//! clone waits on one oneshot receiver, which keeps the waker of whichever
//! task polled it last. The controller's own runner waits on it too, so a
//! second waiter (ours, for `/readyz`) could sleep forever while the
//! reconciler ran normally: on a real API server the leader never turned
//! Ready. Instead, the flag is set by the watch stream itself when it yields
//! the end of the initial list, in the same poll that makes the store ready.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::runtime::{WatchStreamExt, reflector::store::Writer};

/// Raises `synced` once `events` has delivered a whole initial list; logs
/// watch errors (which the controller retries with backoff) at warn, since a
/// watch that keeps failing is why a leader stays unready.
pub fn flag_initial_sync<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    synced: Arc<AtomicBool>,
    what: &'static str,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> {
    events.inspect(move |event| match event {
        Ok(watcher::Event::InitDone) => {
            if !synced.swap(true, Ordering::Relaxed) {
                tracing::info!(cache = what, "cache synced; ready");
            }
        }
        Err(e) => tracing::warn!(cache = what, error = %e, "watch failed; retrying"),
        Ok(_) => {}
    })
}

/// A reflected watch of `api` whose initial list raises `synced`: the
/// trigger stream and store of a `Controller::for_stream`.
pub fn watched<K>(
    api: kube::Api<K>,
    config: watcher::Config,
    synced: Arc<AtomicBool>,
    what: &'static str,
) -> (
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    Store<K>,
)
where
    K: Resource + Clone + Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let writer: Writer<K> = Writer::default();
    let reader = writer.as_reader();
    let events = watcher(api, config).default_backoff();
    let stream =
        reflector::reflector(writer, flag_initial_sync(events, synced, what)).applied_objects();
    (stream, reader)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn map(name: &str) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(name.to_owned());
        cm.metadata.namespace = Some("ns".to_owned());
        cm
    }

    #[tokio::test]
    async fn the_flag_rises_at_the_end_of_the_initial_list_even_when_the_store_has_other_waiters() {
        let synced = Arc::new(AtomicBool::new(false));
        let writer: Writer<ConfigMap> = Writer::default();
        let store = writer.as_reader();
        // Someone else (the controller's runner) waits on the store.
        let other_waiter = tokio::spawn({
            let store = store.clone();
            async move { store.wait_until_ready().await.is_ok() }
        });
        tokio::task::yield_now().await;
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut stream = Box::pin(reflector::reflector(
            writer,
            flag_initial_sync(rx, synced.clone(), "test"),
        ));
        for event in [watcher::Event::Init, watcher::Event::InitApply(map("a"))] {
            tx.unbounded_send(Ok(event)).unwrap();
            stream.next().await.unwrap().unwrap();
        }
        assert!(!synced.load(Ordering::Relaxed), "not before the list ends");
        tx.unbounded_send(Ok(watcher::Event::InitDone)).unwrap();
        stream.next().await.unwrap().unwrap();
        assert!(synced.load(Ordering::Relaxed));
        assert_eq!(store.state().len(), 1, "the store holds the list");
        assert!(
            other_waiter.await.unwrap(),
            "the other waiter is released too"
        );
    }

    #[tokio::test]
    async fn a_failing_watch_leaves_the_flag_down() {
        let synced = Arc::new(AtomicBool::new(false));
        let events = futures::stream::iter([
            Ok(watcher::Event::Init),
            Err(watcher::Error::NoResourceVersion),
        ]);
        let seen: Vec<_> = flag_initial_sync::<ConfigMap>(events, synced.clone(), "test")
            .collect()
            .await;
        assert_eq!(seen.len(), 2);
        assert!(!synced.load(Ordering::Relaxed));
    }
}
