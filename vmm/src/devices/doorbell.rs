//! The asynchronous doorbell: an ioeventfd on the doorbell port. KVM signals the eventfd
//! and resumes the guest without an exit to user space; the event-manager thread reads
//! the eventfd and counts the rings.

use event_manager::{EventOps, Events, MutEventSubscriber};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// The doorbell's event-loop side.
pub struct Doorbell {
    eventfd: EventFd,
    rings: Arc<AtomicU64>,
}

impl Doorbell {
    /// A doorbell counting into `rings`; `eventfd` is the one registered as the ioeventfd.
    pub fn new(eventfd: EventFd, rings: Arc<AtomicU64>) -> Self {
        Doorbell { eventfd, rings }
    }
}

impl MutEventSubscriber for Doorbell {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            // The eventfd counter holds the number of rings since the last read.
            if let Ok(n) = self.eventfd.read() {
                self.rings.fetch_add(n, Ordering::SeqCst);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.eventfd, EventSet::IN)) {
            log::error!("cannot watch the doorbell eventfd: {e:?}");
        }
    }
}
