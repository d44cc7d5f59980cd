//! One timer for all the deadlines of a tunnel's phases (reading a head,
//! waiting for the upstream's answer, the total timeout).
//!
//! `tokio::time::timeout_at` per phase puts an entry in the runtime's timer
//! wheel, under the driver's lock, whenever the phase has to wait, and
//! takes it out, under the lock again, when the phase ends: twice per
//! keep-alive request on the fast path. This timer is created once per
//! tunnel and stays registered. Each phase arms it at the phase's deadline
//! or at `now + lead` (the shortest timeout any phase has), whichever comes
//! first. While requests follow one another that moment only moves forward,
//! and tokio moves a registered timer forward by storing the later tick:
//! no lock, no wheel work. When the timer goes off before the phase's own
//! deadline (a phase that waits longer than `lead`), it is re-armed at that
//! deadline; a phase still ends exactly when its deadline passes.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

pub(crate) struct PhaseTimer {
    sleep: Pin<Box<Sleep>>,
    /// The shortest timeout of any phase.
    lead: Duration,
}

/// A phase's deadline passed before it ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Elapsed;

impl PhaseTimer {
    /// `lead`: the shortest timeout the phases have (a longer one costs a
    /// re-registration per phase, a shorter one a wake-up per phase that
    /// waits longer than it).
    pub fn new(lead: Duration) -> PhaseTimer {
        let lead = lead.max(Duration::from_millis(1));
        PhaseTimer {
            sleep: Box::pin(tokio::time::sleep_until(far_from(Instant::now(), lead))),
            lead,
        }
    }

    /// Runs `fut` until it ends (`Ok`) or `deadline` passes (`Err`).
    pub async fn within<F: Future>(
        &mut self,
        deadline: Instant,
        fut: F,
    ) -> Result<F::Output, Elapsed> {
        self.within_from(Instant::now(), deadline, fut).await
    }

    /// [`PhaseTimer::within`] with the current time read by the caller,
    /// for a caller that has just read it. An earlier `now` is never
    /// wrong: the phase still ends exactly at `deadline`, the timer may
    /// only go off once more on the way.
    pub async fn within_from<F: Future>(
        &mut self,
        now: Instant,
        deadline: Instant,
        fut: F,
    ) -> Result<F::Output, Elapsed> {
        self.arm(now, deadline);
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            // What is ready is taken first, as `timeout_at` does.
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            while self.sleep.as_mut().poll(cx).is_ready() {
                if self.sleep.deadline() >= deadline {
                    return Poll::Ready(Err(Elapsed));
                }
                // Armed at `lead`: the phase may go on until its deadline.
                self.sleep.as_mut().reset(deadline);
            }
            Poll::Pending
        })
        .await
    }

    /// Arms the timer for a phase ending at `deadline`. A timer already
    /// armed no later than the deadline and at least half a lead from now
    /// is left as it is: it cannot let the phase overrun (when it goes off
    /// before the deadline it is re-armed there), and it goes off at most
    /// once per half lead of waiting. Most phases then reset nothing; a
    /// reset costs a conversion of the instant to the driver's ticks and an
    /// atomic store, for each phase of every request.
    fn arm(&mut self, now: Instant, deadline: Instant) {
        let armed = self.sleep.deadline();
        if armed <= deadline && armed >= far_from(now, self.lead / 2) {
            return;
        }
        self.sleep
            .as_mut()
            .reset(deadline.min(far_from(now, self.lead)));
    }
}

/// `now + d`, or a moment far enough away when that does not fit.
fn far_from(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// `timer.within(deadline, pending)`, failing the test rather than
    /// hanging it when the timer never goes off.
    async fn never_ends(timer: &mut PhaseTimer, deadline: Instant) -> Result<(), Elapsed> {
        tokio::time::timeout(
            Duration::from_secs(5),
            timer.within(deadline, std::future::pending::<()>()),
        )
        .await
        .expect("the phase's deadline was not kept")
    }

    #[tokio::test]
    async fn a_phase_that_ends_in_time_returns_its_output() {
        let mut timer = PhaseTimer::new(ms(20));
        let out = timer
            .within(Instant::now() + ms(500), async {
                tokio::time::sleep(ms(40)).await;
                7
            })
            .await;
        // Longer than the lead, shorter than the deadline.
        assert_eq!(out, Ok(7));
    }

    #[tokio::test]
    async fn a_phase_longer_than_the_lead_ends_at_its_own_deadline() {
        let mut timer = PhaseTimer::new(ms(20));
        let started = std::time::Instant::now();
        let out = never_ends(&mut timer, Instant::now() + ms(200)).await;
        assert_eq!(out, Err(Elapsed));
        let took = started.elapsed();
        assert!(took >= ms(200), "ended after {took:?}, at the lead");
        assert!(took < ms(2000), "ended after {took:?}");
    }

    #[tokio::test]
    async fn a_deadline_before_the_lead_is_kept() {
        let mut timer = PhaseTimer::new(Duration::from_secs(30));
        let started = std::time::Instant::now();
        let out = never_ends(&mut timer, Instant::now() + ms(50)).await;
        assert_eq!(out, Err(Elapsed));
        assert!(started.elapsed() < ms(2000), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn phases_after_a_timeout_or_a_long_phase_keep_their_deadlines() {
        let mut timer = PhaseTimer::new(ms(30));
        // A long phase (the timer fired at the lead and was re-armed),
        // then one that times out, then quick ones.
        assert_eq!(
            timer
                .within(Instant::now() + ms(1000), tokio::time::sleep(ms(80)))
                .await,
            Ok(())
        );
        assert_eq!(
            never_ends(&mut timer, Instant::now() + ms(60)).await,
            Err(Elapsed)
        );
        for _ in 0..3 {
            assert_eq!(
                timer.within(Instant::now() + ms(60), async {}).await,
                Ok(())
            );
        }
        let started = std::time::Instant::now();
        assert_eq!(
            never_ends(&mut timer, Instant::now() + ms(120)).await,
            Err(Elapsed)
        );
        assert!(started.elapsed() >= ms(120), "{:?}", started.elapsed());
        // A deadline already past ends a pending phase at once.
        assert_eq!(
            never_ends(&mut timer, Instant::now() - ms(5)).await,
            Err(Elapsed)
        );
    }

    #[tokio::test]
    async fn quick_phases_leave_the_timer_armed_and_a_sooner_deadline_still_holds() {
        let mut timer = PhaseTimer::new(Duration::from_secs(30));
        let far = || Instant::now() + Duration::from_secs(60);
        assert_eq!(timer.within(far(), async {}).await, Ok(()));
        let armed = timer.sleep.deadline();
        for _ in 0..3 {
            assert_eq!(timer.within(far(), async {}).await, Ok(()));
        }
        assert_eq!(timer.sleep.deadline(), armed, "re-armed within half a lead");
        // A deadline before the armed moment re-arms the timer.
        let started = std::time::Instant::now();
        assert_eq!(
            never_ends(&mut timer, Instant::now() + ms(50)).await,
            Err(Elapsed)
        );
        assert!(started.elapsed() < ms(2000), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn an_earlier_now_never_ends_a_phase_early() {
        let mut timer = PhaseTimer::new(ms(20));
        // The timer went off at this phase's deadline and stays elapsed.
        assert_eq!(
            never_ends(&mut timer, Instant::now() + ms(30)).await,
            Err(Elapsed)
        );
        let stale = Instant::now() - Duration::from_secs(1);
        let started = std::time::Instant::now();
        let out = tokio::time::timeout(
            Duration::from_secs(5),
            timer.within_from(
                stale,
                Instant::now() + ms(100),
                std::future::pending::<()>(),
            ),
        )
        .await
        .expect("the phase's deadline was not kept");
        assert_eq!(out, Err(Elapsed));
        let took = started.elapsed();
        assert!(took >= ms(100), "ended after {took:?}, before its deadline");
    }

    #[tokio::test]
    async fn a_huge_lead_does_not_overflow() {
        let mut timer = PhaseTimer::new(Duration::MAX);
        assert_eq!(
            timer.within(Instant::now() + ms(10), async { 1 }).await,
            Ok(1)
        );
        assert_eq!(
            never_ends(&mut timer, Instant::now() + ms(10)).await,
            Err(Elapsed)
        );
    }
}
