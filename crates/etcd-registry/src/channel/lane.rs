//! The channel's two balancers (same zone, other zones), each one of tower's
//! p2c over the endpoints the manager inserts, and how calls share them.
//!
//! A balancer is polled under a short synchronous lock, never held across an
//! `await`: a call locks it, polls it ready, dispatches and unlocks, all in
//! one poll. A call future that is then parked (polled once, never again)
//! holds nothing, so it cannot stall the others, as a fair async mutex
//! handed to a task that is not being polled would.
//!
//! Every poll of either balancer uses the same waker, [`Lanes::waker`],
//! which wakes every waiting call at once (a `Notify`): tower registers only
//! the last waker it was polled with, and with one waker for all of them no
//! waiter's wake-up is lost. A waiting call registers with the `Notify`
//! before it polls, then waits on it.
//!
//! The manager's changes are taken in by a poll of the balancer. So that an
//! idle channel does not pile them up (each holding a tonic channel and its
//! task), one task per channel, [`drain`], polls both balancers whenever
//! their waker fires: on a change, or an endpoint becoming ready. Calls
//! never wait on it; it costs nothing per call.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tower::balance::p2c::Balance;
use tower::discover::Change;
use tower::{BoxError, Service};

use super::manager::{Balanced, ChangeTx};

type Request = http::Request<Body>;
type Balancer = Balance<Changes, Request>;
/// What a dispatched call resolves to.
pub(crate) type Answer = <Balancer as Service<Request>>::Future;

/// The manager's changes for one balancer, as tower's `Discover`.
pub(crate) struct Changes(mpsc::UnboundedReceiver<Change<String, Balanced>>);

impl futures::Stream for Changes {
    type Item = Result<Change<String, Balanced>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|c| c.map(Ok))
    }
}

/// One balancer.
pub(crate) struct Lane {
    balancer: Mutex<Balancer>,
}

impl Lane {
    /// Dispatches the request to a ready endpoint (taking it), or leaves it
    /// when none is ready (the waker is then registered).
    pub(crate) fn try_call(
        &self,
        waker: &Waker,
        request: &mut Option<Request>,
    ) -> Poll<std::result::Result<Answer, BoxError>> {
        let mut balancer = self.balancer.lock().unwrap_or_else(PoisonError::into_inner);
        match balancer.poll_ready(&mut Context::from_waker(waker)) {
            Poll::Ready(Ok(())) => match request.take() {
                Some(request) => Poll::Ready(Ok(balancer.call(request))),
                None => Poll::Ready(Err("request already sent".into())),
            },
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Takes in pending changes and readiness; dispatches nothing.
    fn poll(&self, waker: &Waker) {
        let mut balancer = self.balancer.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = balancer.poll_ready(&mut Context::from_waker(waker));
    }
}

/// Wakes every waiter.
struct Fanout(Notify);

impl Wake for Fanout {
    fn wake(self: Arc<Self>) {
        self.0.notify_waiters();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_waiters();
    }
}

/// Both balancers, and the one waker they are polled with.
pub(crate) struct Lanes {
    pub(crate) local: Lane,
    pub(crate) remote: Lane,
    fanout: Arc<Fanout>,
    pub(crate) waker: Waker,
}

impl Lanes {
    /// The lanes, and the manager's senders for the local and remote one.
    pub(crate) fn new() -> (Arc<Self>, ChangeTx, ChangeTx) {
        let (local_tx, local_rx) = mpsc::unbounded_channel();
        let (remote_tx, remote_rx) = mpsc::unbounded_channel();
        let lane = |rx| Lane {
            balancer: Mutex::new(Balance::new(Changes(rx))),
        };
        let fanout = Arc::new(Fanout(Notify::new()));
        let lanes = Self {
            local: lane(local_rx),
            remote: lane(remote_rx),
            waker: Waker::from(fanout.clone()),
            fanout,
        };
        (Arc::new(lanes), local_tx, remote_tx)
    }

    /// Resolves at the next wake-up of either balancer after it was
    /// enabled; enable it before polling them.
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.fanout.0.notified()
    }
}

/// Polls both balancers at every wake-up, until `stop`: the task that keeps
/// an idle channel from piling up changes.
pub(crate) async fn drain(lanes: Arc<Lanes>, stop: CancellationToken) {
    loop {
        let notified = lanes.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        lanes.local.poll(&lanes.waker);
        lanes.remote.poll(&lanes.waker);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = notified => {}
        }
    }
}
