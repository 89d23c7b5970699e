//! [`EndOfStreamChannel`]: a channel whose requests end with their last
//! data frame instead of an empty frame after it.
//!
//! tonic's request body does not know it has ended until it is polled
//! once more, so hyper sends a unary request as headers, a data frame and
//! then, after a round of its tasks, an empty frame that ends the stream.
//! A unary server reads the request's end before it runs the handler, so
//! that straggling frame delays every call and wakes the server twice.
//! Looking one frame ahead tells hyper that the data frame is the last.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;
use tonic::transport::Channel;

/// A request body that looks one frame ahead after each data frame, so
/// that [`Body::is_end_stream`] is true as soon as that frame is the last.
pub struct EndsWithData {
    inner: tonic::body::Body,
    /// A frame read ahead, returned by the next poll.
    ahead: Option<Result<Frame<Bytes>, Status>>,
    ended: bool,
}

impl EndsWithData {
    pub fn new(inner: tonic::body::Body) -> Self {
        Self {
            inner,
            ahead: None,
            ended: false,
        }
    }
}

impl Body for EndsWithData {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(frame) = this.ahead.take() {
            return Poll::Ready(Some(frame));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.ended = true,
            Some(Ok(data)) if data.is_data() => {
                // A body that is not ready to say what comes next has not
                // ended: its next frame comes on a later poll, as before.
                if let Poll::Ready(next) = Pin::new(&mut this.inner).poll_frame(cx) {
                    match next {
                        None => this.ended = true,
                        Some(next) => this.ahead = Some(next),
                    }
                }
            }
            Some(_) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_none() && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.ahead.is_some() {
            // The frame read ahead is no longer counted by the inner body.
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}

/// A [`Channel`] whose requests' bodies are [`EndsWithData`].
#[derive(Clone, Debug)]
pub struct EndOfStreamChannel(Channel);

impl EndOfStreamChannel {
    pub fn new(channel: Channel) -> Self {
        Self(channel)
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for EndOfStreamChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        self.0
            .call(request.map(|body| tonic::body::Body::new(EndsWithData::new(body))))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    use super::*;

    /// Yields its frames one per poll, `Pending` where a frame is `None`.
    struct Scripted(VecDeque<Option<Frame<Bytes>>>);

    impl Body for Scripted {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            match self.0.pop_front() {
                None => Poll::Ready(None),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Some(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            }
        }
    }

    struct NoWake;

    impl Wake for NoWake {
        fn wake(self: Arc<Self>) {}
    }

    /// Each frame the body yields, with whether it then says it has ended.
    fn drain(frames: Vec<Option<Frame<Bytes>>>) -> Vec<(Vec<u8>, bool)> {
        let waker = Waker::from(Arc::new(NoWake));
        let mut cx = Context::from_waker(&waker);
        let mut body = EndsWithData::new(tonic::body::Body::new(Scripted(frames.into())));
        let mut seen = Vec::new();
        for _ in 0..20 {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Pending => continue,
                Poll::Ready(None) => return seen,
                Poll::Ready(Some(frame)) => {
                    let data = frame.unwrap().into_data().unwrap_or_default();
                    seen.push((data.to_vec(), body.is_end_stream()));
                }
            }
        }
        panic!("the body never ended: {seen:?}");
    }

    fn data(bytes: &'static [u8]) -> Option<Frame<Bytes>> {
        Some(Frame::data(Bytes::from_static(bytes)))
    }

    #[test]
    fn a_unary_request_ends_with_its_data_frame() {
        assert_eq!(
            drain(vec![data(b"message")]),
            vec![(b"message".to_vec(), true)]
        );
    }

    #[test]
    fn frames_read_ahead_come_next_in_order() {
        assert_eq!(
            drain(vec![data(b"one"), data(b"two"), data(b"three")]),
            vec![
                (b"one".to_vec(), false),
                (b"two".to_vec(), false),
                (b"three".to_vec(), true)
            ]
        );
    }

    #[test]
    fn a_body_not_ready_to_go_on_has_not_ended() {
        assert_eq!(
            drain(vec![data(b"one"), None, data(b"two"), None]),
            vec![(b"one".to_vec(), false), (b"two".to_vec(), false)]
        );
    }
}
