//! [`CoalescingIo`]: a server connection that sends a gRPC reply in one
//! write instead of two.
//!
//! h2 holds a DATA frame's payload by reference and flushes it to the
//! socket before it encodes the next frame, so a unary reply leaves as two
//! writes: headers and data, then the trailers that carry `grpc-status`
//! (hyperium/h2#902). With Nagle off each write is a segment of its own,
//! and the caller wakes for the first only to wait for the second. This
//! wrapper keeps small writes and lets the first flush of a burst through
//! without writing, so the next flush of the same poll (the trailers')
//! sends everything at once. It wakes its task when it holds bytes back:
//! the connection is polled again at once and flushes on that poll
//! (h2 flushes on every poll of a connection), so nothing waits longer
//! than one turn of the runtime. A reader that polls only its read side
//! (a TLS handshake awaiting the peer's next message) gets the held bytes
//! written on its second read, one turn later.
//!
//! Clients get the same through [`CoalescingConnector`]: a request's
//! headers and its data (which ends the stream, see
//! [`crate::end_of_stream`]) leave in one write.
//!
//! Only for sockets, whose flush does nothing: a held write is sent
//! without flushing `T` when it leaves on a read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes of at least this many bytes go to the socket directly, after
/// what is held: copying them would cost more than the write they save.
const DIRECT_WRITE_BYTES: usize = 64 * 1024;

/// A connection whose small writes are held until a flush, and whose first
/// flush of a burst is put off to the next one (see the module docs).
#[derive(Debug)]
pub struct CoalescingIo<T> {
    inner: T,
    /// Bytes accepted but not yet written to `inner`.
    held: Vec<u8>,
    /// How many bytes of `held` `inner` has taken.
    written: usize,
    /// A flush was put off, and the task woken to flush on its next poll.
    flush_put_off: bool,
    /// Reads since the flush was put off.
    reads_while_put_off: u8,
}

impl<T> CoalescingIo<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            held: Vec::new(),
            written: 0,
            flush_put_off: false,
            reads_while_put_off: 0,
        }
    }

    /// The connection inside.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncWrite + Unpin> CoalescingIo<T> {
    /// Writes every held byte to `inner`.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.held.len() {
            let written =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.written..]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += written;
        }
        self.held.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for CoalescingIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // A reader that woke for the put-off flush may not flush again (a
        // TLS handshake waiting for the peer's answer only reads): on its
        // second read what is held leaves. The first read may be h2's on
        // the poll that flushes the rest of a request queued meanwhile.
        let this = self.get_mut();
        if this.flush_put_off {
            this.reads_while_put_off += 1;
            if this.reads_while_put_off < 2 {
                cx.waker().wake_by_ref();
            } else if let Poll::Ready(written) = this.poll_write_held(cx) {
                written?;
                this.flush_put_off = false;
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|buf| buf.len()).sum();
        if this.held.len() + total < DIRECT_WRITE_BYTES {
            for buf in bufs {
                this.held.extend_from_slice(buf);
            }
            return Poll::Ready(Ok(total));
        }
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.held.is_empty() && !this.flush_put_off {
            this.flush_put_off = true;
            this.reads_while_put_off = 0;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_write_held(cx))?;
        this.flush_put_off = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        this.flush_put_off = false;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
    for CoalescingIo<T>
{
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Connects a data-path channel's TCP connections, each a
/// [`CoalescingIo`]: a request's headers, data and end of stream leave in
/// one write. TLS, when the endpoint has it, runs on top (tonic adds it).
#[derive(Clone, Debug)]
pub struct CoalescingConnector {
    http: hyper_util::client::legacy::connect::HttpConnector,
}

impl CoalescingConnector {
    /// Connections with Nagle's algorithm off, to any URI scheme (tonic
    /// checks the scheme against its TLS settings).
    pub fn new() -> Self {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        Self { http }
    }
}

impl Default for CoalescingConnector {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a connection could not be made, as tonic takes it.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Connecting = Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    hyper_util::rt::TokioIo<CoalescingIo<tokio::net::TcpStream>>,
                    BoxError,
                >,
            > + Send,
    >,
>;

impl tower::Service<http::Uri> for CoalescingConnector {
    type Response = hyper_util::rt::TokioIo<CoalescingIo<tokio::net::TcpStream>>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let stream = connecting.await?.into_inner();
            Ok(hyper_util::rt::TokioIo::new(CoalescingIo::new(stream)))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use super::*;

    /// Records each write it is given.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        shut_down: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let joined: Vec<u8> = bufs.iter().flat_map(|buf| buf.iter().copied()).collect();
            let len = joined.len();
            self.writes.push(joined);
            Poll::Ready(Ok(len))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut_down = true;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Recorder {
        /// The peer has not answered yet.
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    /// Counts wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A waker and the count of its wake-ups.
    fn counted_waker() -> (Arc<Wakes>, Waker) {
        let wakes = Arc::new(Wakes::default());
        (Arc::clone(&wakes), Waker::from(wakes))
    }

    fn write(io: &mut CoalescingIo<Recorder>, cx: &mut Context<'_>, bytes: &[u8]) {
        let poll = Pin::new(io).poll_write(cx, bytes);
        assert!(matches!(poll, Poll::Ready(Ok(n)) if n == bytes.len()));
    }

    fn flush(io: &mut CoalescingIo<Recorder>, cx: &mut Context<'_>) {
        assert!(matches!(Pin::new(io).poll_flush(cx), Poll::Ready(Ok(()))));
    }

    #[test]
    fn a_reply_and_its_trailers_leave_in_one_write() {
        let (wakes, waker) = counted_waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescingIo::new(Recorder::default());

        // h2's poll: headers and data, a flush, the trailers, a flush.
        let vectored = [io::IoSlice::new(b"head"), io::IoSlice::new(b"data")];
        let poll = Pin::new(&mut io).poll_write_vectored(&mut cx, &vectored);
        assert!(matches!(poll, Poll::Ready(Ok(8))));
        flush(&mut io, &mut cx);
        assert!(io.get_ref().writes.is_empty(), "the first flush is put off");
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "and the task woken");
        write(&mut io, &mut cx, b"trailers");
        flush(&mut io, &mut cx);
        assert_eq!(io.get_ref().writes, vec![b"headdatatrailers".to_vec()]);
        assert_eq!(io.get_ref().flushes, 1);

        // The woken poll finds nothing held and flushes straight through.
        flush(&mut io, &mut cx);
        assert_eq!(io.get_ref().writes.len(), 1);
        assert_eq!(io.get_ref().flushes, 2);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_lone_frame_leaves_on_the_next_flush() {
        let (wakes, waker) = counted_waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescingIo::new(Recorder::default());
        write(&mut io, &mut cx, b"ping ack");
        flush(&mut io, &mut cx);
        assert!(io.get_ref().writes.is_empty());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        // The poll the wake-up brings.
        flush(&mut io, &mut cx);
        assert_eq!(io.get_ref().writes, vec![b"ping ack".to_vec()]);
        // A new burst is put off again, once.
        write(&mut io, &mut cx, b"next");
        flush(&mut io, &mut cx);
        assert_eq!(io.get_ref().writes.len(), 1);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        flush(&mut io, &mut cx);
        assert_eq!(io.get_ref().writes[1], b"next");
    }

    #[test]
    fn a_reader_that_does_not_flush_again_still_sends_what_is_held() {
        let (wakes, waker) = counted_waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescingIo::new(Recorder::default());
        // A TLS handshake: its flight, a flush, then only reads.
        write(&mut io, &mut cx, b"server hello");
        flush(&mut io, &mut cx);
        assert!(io.get_ref().writes.is_empty());
        let mut space = [0u8; 16];
        let mut buf = ReadBuf::new(&mut space);
        // The read of the same poll, then the read of the poll it woke.
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut buf).is_pending());
        assert!(io.get_ref().writes.is_empty());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2, "woken again to read");
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut buf).is_pending());
        assert_eq!(io.get_ref().writes, vec![b"server hello".to_vec()]);
        // Nothing is sent twice, and the next flush goes straight through.
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut buf).is_pending());
        flush(&mut io, &mut cx);
        assert_eq!(io.get_ref().writes.len(), 1);
        assert_eq!(io.get_ref().flushes, 1);
    }

    #[test]
    fn frames_queued_before_the_next_poll_flushes_join_the_held_ones() {
        let (_, waker) = counted_waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescingIo::new(Recorder::default());
        // A client's poll that found only the request's headers.
        write(&mut io, &mut cx, b"headers");
        flush(&mut io, &mut cx);
        // The next poll reads first, then writes and flushes the body.
        let mut space = [0u8; 16];
        let mut buf = ReadBuf::new(&mut space);
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut buf).is_pending());
        write(&mut io, &mut cx, b"data");
        write(&mut io, &mut cx, b"eos");
        flush(&mut io, &mut cx);
        assert_eq!(io.get_ref().writes, vec![b"headersdataeos".to_vec()]);
    }

    #[test]
    fn large_writes_pass_through_after_what_is_held() {
        let (_, waker) = counted_waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescingIo::new(Recorder::default());
        write(&mut io, &mut cx, b"head");
        let large = vec![7u8; DIRECT_WRITE_BYTES];
        write(&mut io, &mut cx, &large);
        assert_eq!(io.get_ref().writes, vec![b"head".to_vec(), large]);
        flush(&mut io, &mut cx);
        assert_eq!(io.get_ref().flushes, 1, "nothing held: no flush put off");
    }

    #[test]
    fn shutdown_writes_what_is_held_first() {
        let (_, waker) = counted_waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescingIo::new(Recorder::default());
        write(&mut io, &mut cx, b"goaway");
        flush(&mut io, &mut cx);
        let poll = Pin::new(&mut io).poll_shutdown(&mut cx);
        assert!(matches!(poll, Poll::Ready(Ok(()))));
        assert_eq!(io.get_ref().writes, vec![b"goaway".to_vec()]);
        assert!(io.get_ref().shut_down);
    }
}
