//! Waiting by polling instead of sleeping, for the few waits inside a migration's
//! downtime, when the guest is paused and its cores are free. On the 2-core test host a
//! thread asleep in a read or a channel receive took 25-130 us to run again once woken:
//! a socket's wake-up puts the reader on the writer's core, where it waits until the writer
//! sleeps or is preempted. Between polls the core is yielded, so a thread sharing it (the
//! one to be waited for, on one host) goes first.

use std::time::{Duration, Instant};

/// Calls `probe` until it returns something or `limit` has passed, yielding the core
/// between calls.
pub fn until<T>(limit: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn it_returns_what_the_probe_found_or_gives_up_at_the_limit() {
        let mut calls = 0;
        assert_eq!(
            super::until(std::time::Duration::from_secs(5), || {
                calls += 1;
                (calls == 3).then_some(calls)
            }),
            Some(3)
        );
        let start = std::time::Instant::now();
        assert_eq!(super::until::<()>(std::time::Duration::from_millis(20), || None), None);
        assert!(start.elapsed() >= std::time::Duration::from_millis(20));
    }
}
