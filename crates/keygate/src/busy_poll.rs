//! `--busy-poll-us`: keep polling for I/O for a short while after the
//! last work instead of sleeping in `epoll_wait` at once.
//!
//! On a virtual machine a sleeping thread (and its idle vCPU) takes tens of
//! microseconds to wake, and a request through keygate wakes keygate twice
//! (request from the agent, response from the upstream). A thread that is
//! still polling when the next packet lands answers at once. The price is
//! CPU: up to the window's length after every burst of work, spent in
//! non-blocking `epoll_wait` calls with a `sched_yield` between them, so
//! that any other runnable thread on the core goes first.
//!
//! How: the runtime's unpark hook (it runs whenever the thread wakes from a
//! real sleep) wakes a spinner task. The spinner yields to the scheduler in
//! a loop; a current-thread runtime with a yielded task polls the driver
//! with a zero timeout, runs what became ready and comes back to the
//! spinner. The window is counted from the wake-up and never extended, so
//! the CPU spent polling is at most the window per real wake-up, whatever
//! the load and however slow the machine: an idle keygate sleeps and uses
//! no CPU. (A window extended by "work seen" was tried: on a slow machine
//! every iteration looked like work and the thread never slept.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The hand-over between the runtime's unpark hook and the spinner task.
#[derive(Default)]
pub struct BusyPoll {
    woke: Arc<Notify>,
}

impl BusyPoll {
    /// Installs the unpark hook on a current-thread runtime builder.
    pub fn install(builder: &mut tokio::runtime::Builder) -> BusyPoll {
        let poll = BusyPoll::default();
        let woke = poll.woke.clone();
        builder.on_thread_unpark(move || woke.notify_one());
        poll
    }

    /// The spinner: runs for the life of the runtime.
    pub async fn run(self, window: Duration) {
        loop {
            self.woke.notified().await;
            spin(window).await;
        }
    }
}

/// Yields to the scheduler until `window` has passed.
async fn spin(window: Duration) {
    let until = Instant::now() + window;
    while Instant::now() < until {
        // Any other runnable thread on this core goes first.
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> (tokio::runtime::Runtime, BusyPoll) {
        let mut b = tokio::runtime::Builder::new_current_thread();
        let poll = BusyPoll::install(&mut b);
        (b.enable_all().build().unwrap(), poll)
    }

    /// CPU time of this thread (Linux only; elsewhere the tests that
    /// need it do not run).
    #[cfg(target_os = "linux")]
    fn thread_cpu() -> Duration {
        test_support::cpu_time("/proc/thread-self/stat")
    }

    /// The thread's CPU time during a `measured` sleep, on a runtime whose
    /// spinner has a `window`: the thread is woken once from a real sleep
    /// (so the spinner runs), then sleeps `settle` more before measuring.
    #[cfg(target_os = "linux")]
    fn cpu_while_sleeping(window: Duration, settle: Duration, measured: Duration) -> Duration {
        let (rt, poll) = runtime();
        rt.block_on(async {
            tokio::spawn(poll.run(window));
            tokio::time::sleep(Duration::from_millis(5)).await;
            tokio::time::sleep(settle).await;
            let before = thread_cpu();
            tokio::time::sleep(measured).await;
            thread_cpu() - before
        })
    }

    /// After the window the spinner stops and the thread sleeps: a second
    /// of idleness costs (almost) no CPU. Without the window's end it
    /// would cost the whole second.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_idle_runtime_stops_spinning() {
        let ms = Duration::from_millis;
        let spent = cpu_while_sleeping(ms(20), ms(50), ms(1000));
        assert!(spent < ms(200), "idle cost {spent:?}");
    }

    /// After an unpark the spinner does spin: the thread stays busy for
    /// about the window instead of sleeping through it. Sleeping through
    /// it costs nothing; spinning costs most of the 250 ms unless other
    /// busy threads share the core.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_wake_up_is_followed_by_the_window_of_polling() {
        let ms = Duration::from_millis;
        let spent = cpu_while_sleeping(ms(300), ms(0), ms(250));
        assert!(spent >= ms(50), "spun only {spent:?}");
    }

    /// Work that arrives while spinning is served: a timer and a task woken
    /// from another thread both complete.
    #[test]
    fn work_arriving_while_spinning_is_served() {
        let (rt, poll) = runtime();
        rt.block_on(async {
            tokio::spawn(poll.run(Duration::from_millis(200)));
            tokio::time::sleep(Duration::from_millis(1)).await;
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(10));
                tx.send(7).unwrap();
            });
            let got = tokio::time::timeout(Duration::from_secs(5), rx).await;
            assert_eq!(got.unwrap().unwrap(), 7);
        });
    }
}
