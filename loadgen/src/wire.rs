//! The generator's WebSocket transport (RFC 6455, client side): what a device's
//! connection costs is the floor of what the generator costs per device.
//!
//! - Reads go into one scratch buffer per thread, and frames are parsed where they
//!   lie; a connection holds bytes of its own only while a frame is incomplete (a
//!   device between frames owns no read buffer, where tungstenite keeps and zero-fills
//!   4 KiB per connection).
//! - A read hands every complete message it finished to the caller's callback in
//!   arrival order, borrowed from the buffer: no copy, no allocation per message.
//! - Writes are one masked frame per `write`.
//!
//! The frames carried are the protocol's, built and parsed by `chatproof_client`
//! like everywhere else; this is only the byte stream under them.
//! `chatproof_client::Client`, the request/reply client of the simulator and the
//! tests, stays on tungstenite: it holds one connection, not hundreds of thousands.

use std::cell::RefCell;
use std::pin::Pin;
use std::task::Poll;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};

/// Bytes one read into the per-thread scratch buffer takes at most.
const SCRATCH_BYTES: usize = 64 * 1024;
/// The largest message (all its fragments) accepted from the server.
pub const MESSAGE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// The largest handshake response accepted.
const HANDSHAKE_BYTES_MAX: usize = 16 * 1024;
/// Bytes read at least at a time into a connection's own buffer of an incomplete frame.
const PARTIAL_READ_MIN: usize = 4096;

thread_local! {
    /// Where a thread reads every connection's bytes; only the incomplete frame at
    /// the end of a read is copied out of it.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

/// A message from the server, borrowed from the buffer it was read into.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A text message (the protocol's frames are all text).
    Text(&'a str),
    /// A ping: the caller answers it with [`WireWriter::pong`] and the same payload.
    Ping(&'a [u8]),
}

/// A frame's kind (RFC 6455 section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn of(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// A frame's header: its kind, whether it ends its message, and its sizes.
struct Header {
    opcode: Opcode,
    fin: bool,
    header_len: usize,
    payload_len: usize,
}

/// Reads the header at the start of `bytes`: `Ok(None)` while it is incomplete, an
/// error for what a server must not send (reserved bits, a mask, an unknown opcode,
/// a fragmented or long control frame, a message past [`MESSAGE_BYTES_MAX`]).
fn header(bytes: &[u8]) -> anyhow::Result<Option<Header>> {
    let [b0, b1, ..] = *bytes else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        bail!("a frame with reserved bits set (no extension was negotiated)");
    }
    let opcode = Opcode::of(b0 & 0x0F).ok_or_else(|| anyhow!("unknown opcode {:#x}", b0 & 0x0F))?;
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 != 0 {
        bail!("a masked frame from the server");
    }
    let (header_len, payload_len) = match b1 & 0x7F {
        126 => match bytes.get(2..4) {
            Some(len) => (4, usize::from(u16::from_be_bytes([len[0], len[1]]))),
            None => return Ok(None),
        },
        127 => match bytes.get(2..10) {
            Some(len) => {
                let len = u64::from_be_bytes(len.try_into().expect("eight bytes"));
                (10, usize::try_from(len).unwrap_or(usize::MAX))
            }
            None => return Ok(None),
        },
        short => (2, usize::from(short)),
    };
    if opcode.is_control() && (!fin || payload_len > 125) {
        bail!("a control frame that is fragmented or longer than 125 bytes");
    }
    if payload_len > MESSAGE_BYTES_MAX {
        bail!("a frame of {payload_len} bytes (at most {MESSAGE_BYTES_MAX})");
    }
    Ok(Some(Header {
        opcode,
        fin,
        header_len,
        payload_len,
    }))
}

/// The reading half of a connection.
pub struct WireReader {
    half: OwnedReadHalf,
    /// The bytes of an incomplete frame; empty (and unallocated) between frames.
    partial: Vec<u8>,
    /// Bytes the incomplete frame in `partial` needs in all, when its header is known.
    partial_needs: usize,
    /// `partial` holds what the server sent right behind its handshake response, not
    /// yet parsed: it may hold complete frames.
    unparsed: bool,
    /// The fragments so far of a fragmented message, and its kind.
    message: Vec<u8>,
    message_kind: Option<Opcode>,
}

/// What parsing a run of bytes ended with.
struct Parsed {
    /// Bytes of complete frames, from the start.
    consumed: usize,
    /// A close frame was among them (what follows it is ignored).
    closed: bool,
    /// Bytes the incomplete frame after `consumed` needs in all, when known.
    needs: usize,
}

impl WireReader {
    /// Waits for bytes from the server and hands every message they complete to
    /// `on`, in order. `Ok(false)` once the server closed the connection (a close
    /// frame or the end of the stream); an error for a protocol violation.
    #[cfg(test)]
    pub async fn read(&mut self, mut on: impl FnMut(Incoming<'_>)) -> anyhow::Result<bool> {
        std::future::poll_fn(|cx| self.poll_read(cx, &mut on)).await
    }

    /// [`Self::read`] as a poll: a caller that polls it in place keeps no read
    /// future of its own (a device's task stays small).
    pub fn poll_read(
        &mut self,
        cx: &mut std::task::Context<'_>,
        on: &mut impl FnMut(Incoming<'_>),
    ) -> Poll<anyhow::Result<bool>> {
        if std::mem::take(&mut self.unparsed) {
            let bytes = std::mem::take(&mut self.partial);
            let parsed = self.parse(&bytes, on)?;
            self.keep_rest(&bytes[parsed.consumed..], parsed.needs);
            if parsed.consumed > 0 {
                return Poll::Ready(Ok(!parsed.closed));
            }
        }
        if self.partial.is_empty() {
            return self.poll_read_scratch(cx, on);
        }
        // An incomplete frame: read the rest of it into its own buffer, a chunk at a
        // time (the chunk is zeroed before the read, so no more than a chunk at once).
        let want = self
            .partial_needs
            .saturating_sub(self.partial.len())
            .clamp(PARTIAL_READ_MIN, SCRATCH_BYTES);
        let had = self.partial.len();
        self.partial.resize(had + want, 0);
        let mut buf = ReadBuf::new(&mut self.partial[had..]);
        let polled = Pin::new(&mut self.half).poll_read(cx, &mut buf);
        let n = buf.filled().len();
        self.partial.truncate(had + n);
        match polled {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            Poll::Ready(Ok(())) if n == 0 => return Poll::Ready(Ok(false)),
            Poll::Ready(Ok(())) => {}
        }
        let bytes = std::mem::take(&mut self.partial);
        let parsed = self.parse(&bytes, on)?;
        self.keep_rest(&bytes[parsed.consumed..], parsed.needs);
        Poll::Ready(Ok(!parsed.closed))
    }

    /// One read into this thread's scratch buffer, parsed where it lies.
    fn poll_read_scratch(
        &mut self,
        cx: &mut std::task::Context<'_>,
        on: &mut impl FnMut(Incoming<'_>),
    ) -> Poll<anyhow::Result<bool>> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut self.half).poll_read(cx, &mut buf) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    if n == 0 {
                        return Poll::Ready(Ok(false));
                    }
                    let bytes = &scratch[..n];
                    Poll::Ready(self.parse(bytes, on).map(|parsed| {
                        self.keep_rest(&bytes[parsed.consumed..], parsed.needs);
                        !parsed.closed
                    }))
                }
            }
        })
    }

    /// Keeps `rest`, the start of an incomplete frame, for the next read; frees the
    /// buffer when nothing is incomplete.
    fn keep_rest(&mut self, rest: &[u8], needs: usize) {
        if rest.is_empty() {
            self.partial = Vec::new();
        } else {
            let mut partial = Vec::with_capacity(needs.max(rest.len()).max(PARTIAL_READ_MIN));
            partial.extend_from_slice(rest);
            self.partial = partial;
        }
        self.partial_needs = needs;
    }

    /// Hands every message the complete frames at the start of `bytes` finish to `on`.
    fn parse(&mut self, bytes: &[u8], on: &mut impl FnMut(Incoming<'_>)) -> anyhow::Result<Parsed> {
        let mut at = 0;
        loop {
            let Some(h) = header(&bytes[at..])? else {
                return Ok(Parsed {
                    consumed: at,
                    closed: false,
                    needs: 0,
                });
            };
            let end = at + h.header_len + h.payload_len;
            if end > bytes.len() {
                return Ok(Parsed {
                    consumed: at,
                    closed: false,
                    needs: h.header_len + h.payload_len,
                });
            }
            let payload = &bytes[at + h.header_len..end];
            at = end;
            match (h.opcode, self.message_kind) {
                (Opcode::Close, _) => {
                    return Ok(Parsed {
                        consumed: at,
                        closed: true,
                        needs: 0,
                    })
                }
                (Opcode::Ping, _) => on(Incoming::Ping(payload)),
                (Opcode::Pong, _) => {}
                (Opcode::Text, None) if h.fin => on(Incoming::Text(
                    std::str::from_utf8(payload).context("a text message that is not UTF-8")?,
                )),
                (Opcode::Binary, None) if h.fin => {} // The protocol sends none; skipped.
                (kind @ (Opcode::Text | Opcode::Binary), None) => {
                    self.message_kind = Some(kind);
                    self.message.extend_from_slice(payload);
                }
                (Opcode::Continuation, Some(kind)) => {
                    if self.message.len() + payload.len() > MESSAGE_BYTES_MAX {
                        bail!("a message longer than {MESSAGE_BYTES_MAX} bytes");
                    }
                    self.message.extend_from_slice(payload);
                    if h.fin {
                        let message = std::mem::take(&mut self.message);
                        self.message_kind = None;
                        if kind == Opcode::Text {
                            on(Incoming::Text(
                                std::str::from_utf8(&message)
                                    .context("a text message that is not UTF-8")?,
                            ));
                        }
                    }
                }
                (Opcode::Continuation, None) => bail!("a continuation frame outside a message"),
                (Opcode::Text | Opcode::Binary, Some(_)) => {
                    bail!("a new message before the fragmented one ended")
                }
            }
        }
    }
}

/// The writing half of a connection.
pub struct WireWriter {
    half: OwnedWriteHalf,
    /// The state of the generator of masking keys (xorshift).
    mask_state: u64,
}

impl WireWriter {
    /// Writes `text` as one text frame.
    pub async fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        self.send(Opcode::Text, text.as_bytes()).await
    }

    /// Answers a ping.
    pub async fn pong(&mut self, payload: &[u8]) -> std::io::Result<()> {
        self.send(Opcode::Pong, payload).await
    }

    /// Says goodbye (a close frame, status 1000) and ends the sending direction; the
    /// server's close ends the reader.
    pub async fn close(&mut self) -> std::io::Result<()> {
        self.send(Opcode::Close, &1000u16.to_be_bytes()).await?;
        self.half.shutdown().await
    }

    fn next_mask(&mut self) -> [u8; 4] {
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.mask_state = x;
        (x as u32).to_ne_bytes()
    }

    async fn send(&mut self, opcode: Opcode, payload: &[u8]) -> std::io::Result<()> {
        let mask = self.next_mask();
        let frame = encode_frame(opcode, payload, mask);
        self.half.write_all(&frame).await
    }
}

/// One final client frame: header, masking key, masked payload.
fn encode_frame(opcode: Opcode, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let len = payload.len();
    let mut frame = Vec::with_capacity(len + 14);
    frame.push(0x80 | opcode.bits());
    match len {
        0..=125 => frame.push(0x80 | len as u8),
        126..=0xFFFF => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    let start = frame.len();
    frame.extend_from_slice(payload);
    for (i, b) in frame[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
    frame
}

/// The opening handshake over `stream` for `ws://{host}{path}`: the split
/// connection, with any bytes the server sent after its response kept for the reader.
pub async fn handshake(
    mut stream: TcpStream,
    host: &str,
    path: &str,
) -> anyhow::Result<(WireReader, WireWriter)> {
    let key = generate_key();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::with_capacity(512);
    let header_end = loop {
        if let Some(at) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if response.len() >= HANDSHAKE_BYTES_MAX {
            bail!("handshake response longer than {HANDSHAKE_BYTES_MAX} bytes");
        }
        response.reserve(512);
        if stream.read_buf(&mut response).await? == 0 {
            bail!("connection closed during the handshake");
        }
    };
    let head = std::str::from_utf8(&response[..header_end]).context("handshake response")?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("101") {
        bail!("handshake refused: {status}");
    }
    let accept = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|(_, value)| value.trim());
    if accept != Some(derive_accept_key(key.as_bytes()).as_str()) {
        bail!("handshake: the server's Sec-WebSocket-Accept does not match the key");
    }
    let rest = response[header_end..].to_vec();
    let mask_seed = key.bytes().fold(0x9E37_79B9_7F4A_7C15_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3)
    }) | 1;
    let (read_half, write_half) = stream.into_split();
    let mut reader = WireReader {
        half: read_half,
        partial: Vec::new(),
        partial_needs: 0,
        unparsed: !rest.is_empty(),
        message: Vec::new(),
        message_kind: None,
    };
    reader.keep_rest(&rest, 0);
    Ok((
        reader,
        WireWriter {
            half: write_half,
            mask_state: mask_seed,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    /// A tungstenite server on loopback running `serve` on its one connection, and
    /// our client connected to it.
    async fn pair<F, Fut>(serve: F) -> (WireReader, WireWriter, tokio::task::JoinHandle<()>)
    where
        F: FnOnce(tokio_tungstenite::WebSocketStream<TcpStream>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let ws = tokio_tungstenite::accept_async(stream).await.unwrap();
            serve(ws).await;
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let (reader, writer) = handshake(stream, &addr.to_string(), "/v1/ws")
            .await
            .unwrap();
        (reader, writer, server)
    }

    /// Reads until `n` texts arrived (answering nothing), or the connection closed.
    async fn texts(reader: &mut WireReader, n: usize) -> (Vec<String>, bool) {
        let mut got = Vec::new();
        while got.len() < n {
            let open = reader
                .read(|m| {
                    if let Incoming::Text(t) = m {
                        got.push(t.to_owned());
                    }
                })
                .await
                .unwrap();
            if !open {
                return (got, false);
            }
        }
        (got, true)
    }

    /// Texts go both ways, in order, short and long (past the scratch buffer and past
    /// the 16-bit length), and a burst of small frames arrives whole.
    #[tokio::test]
    async fn texts_both_ways_of_every_length() {
        let long = "y".repeat(200_000);
        let medium = "m".repeat(300);
        let sent = [String::from("hi"), medium.clone(), long.clone()];
        let (mut reader, mut writer, server) = pair(move |mut ws| async move {
            for expect in ["hi".to_owned(), medium, long] {
                match ws.next().await.unwrap().unwrap() {
                    Message::Text(t) => assert_eq!(t.as_str(), expect),
                    other => panic!("{other:?}"),
                }
            }
            for i in 0..500 {
                ws.feed(Message::Text(format!("burst {i}").into()))
                    .await
                    .unwrap();
            }
            ws.flush().await.unwrap();
            ws.send(Message::Text("z".repeat(100_000).into()))
                .await
                .unwrap();
            ws.close(None).await.unwrap();
        })
        .await;
        for text in &sent {
            writer.send_text(text).await.unwrap();
        }
        let (got, open) = texts(&mut reader, 501).await;
        assert!(open);
        for (i, t) in got[..500].iter().enumerate() {
            assert_eq!(t, &format!("burst {i}"));
        }
        assert_eq!(got[500].len(), 100_000);
        assert!(
            reader.partial.capacity() == 0,
            "no bytes kept between frames"
        );
        let (rest, open) = texts(&mut reader, 1).await;
        assert!(
            rest.is_empty() && !open,
            "the server's close ends the reader"
        );
        server.await.unwrap();
    }

    /// A fragmented message is assembled; a ping interleaved with it comes out at
    /// once and the pong goes back, masked, with its payload. The server side writes
    /// raw frames on the socket under the handshake tungstenite made, at once, so they
    /// may arrive in the same read as the handshake response (which once left them
    /// unparsed while the reader waited for more).
    #[tokio::test]
    async fn fragments_are_joined_and_pings_answered() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut reader, mut writer, server) = pair(|mut ws| async move {
            let raw = ws.get_mut();
            let frame = |b0: u8, payload: &[u8]| {
                let mut f = vec![b0, payload.len() as u8];
                f.extend_from_slice(payload);
                f
            };
            let mut bytes = frame(0x01, b"one "); // text, not final
            bytes.extend(frame(0x89, b"p1")); // ping
            bytes.extend(frame(0x00, b"two ")); // continuation
            bytes.extend(frame(0x80, b"three")); // final continuation
            raw.write_all(&bytes).await.unwrap();
            let mut pong = [0u8; 8];
            raw.read_exact(&mut pong).await.unwrap();
            assert_eq!(pong[..2], [0x8A, 0x82], "a final, masked pong of 2 bytes");
            let key = &pong[2..6];
            assert_eq!([pong[6] ^ key[0], pong[7] ^ key[1]], *b"p1");
            raw.write_all(&frame(0x81, b"after")).await.unwrap();
        })
        .await;
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let mut pings = Vec::new();
            reader
                .read(|m| match m {
                    Incoming::Text(t) => seen.push(t.to_owned()),
                    Incoming::Ping(p) => {
                        seen.push(format!("ping {}", String::from_utf8_lossy(p)));
                        pings.push(p.to_vec());
                    }
                })
                .await
                .unwrap();
            for p in pings {
                writer.pong(&p).await.unwrap();
            }
        }
        assert_eq!(seen, ["ping p1", "one two three"]);
        let (got, _) = texts(&mut reader, 1).await;
        assert_eq!(got, ["after"]);
        server.await.unwrap();
    }

    /// What a server must not send is an error, not a guess.
    #[test]
    fn refuses_what_a_server_must_not_send() {
        let bad: [&[u8]; 4] = [
            &[0x81 | 0x40, 0x01, b'x'],      // reserved bit
            &[0x81, 0x81, 0, 0, 0, 0, b'x'], // masked
            &[0x83, 0x00],                   // unknown opcode
            &[0x09, 0x00],                   // fragmented ping
        ];
        for bytes in bad {
            assert!(header(bytes).is_err(), "{bytes:?}");
        }
        let too_long = [0x81, 127, 0, 0, 0, 0, 0x10, 0, 0, 1];
        assert!(header(&too_long).is_err());
        assert!(header(&[0x81]).unwrap().is_none(), "incomplete, not wrong");
        assert!(header(&[0x81, 126, 0]).unwrap().is_none());
    }

    /// A client frame is masked, and unmasking gives the payload back.
    #[test]
    fn frames_are_masked() {
        for len in [0, 5, 125, 126, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let frame = encode_frame(Opcode::Text, &payload, [1, 2, 3, 4]);
            assert_eq!(frame[0], 0x81);
            assert_eq!(frame[1] & 0x80, 0x80, "mask bit");
            let header_len = match len {
                0..=125 => 2,
                126..=0xFFFF => 4,
                _ => 10,
            };
            let key = &frame[header_len..header_len + 4];
            let unmasked: Vec<u8> = frame[header_len + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i & 3])
                .collect();
            assert_eq!(unmasked, payload);
        }
    }
}
