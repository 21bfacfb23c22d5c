//! A connection in replication mode (`replication=database` in the startup packet), which is what the
//! walsender commands `CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT` and `START_REPLICATION` need
//! (PostgreSQL docs, "Streaming Replication Protocol"). tokio-postgres cannot open one, so this module speaks
//! the startup, authentication and simple-query parts of the protocol itself, with the message codecs of
//! `postgres-protocol`.
//!
//! While a connection is idle after `CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT`, its snapshot stays
//! importable by other sessions (`SET TRANSACTION SNAPSHOT`); the next command on it ends the snapshot.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::conninfo::ConnInfo;
use crate::lsn::Lsn;

/// A failure on the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot reach {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{endpoint} did not answer within {secs} s")]
    Timeout { endpoint: String, secs: u64 },
    #[error("lost the replication connection")]
    Io(#[from] std::io::Error),
    #[error("{message} (SQLSTATE {code})")]
    Server {
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    #[error("the server asked for a password, and none was given")]
    PasswordMissing,
    #[error("the server asked for an authentication method hikkoshi does not support ({0})")]
    UnsupportedAuth(&'static str),
    #[error("the server does not accept TLS, and sslmode={0} requires it")]
    TlsRefused(String),
    #[error("TLS handshake with {endpoint} failed: {reason}")]
    TlsHandshake { endpoint: String, reason: String },
    #[error(transparent)]
    TlsSetup(#[from] crate::tls::TlsError),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ReplicationError {
    /// The SQLSTATE, when the server refused something.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One replication-mode session.
pub struct ReplicationConn {
    stream: Box<dyn Stream>,
    buf: BytesMut,
    out: BytesMut,
    /// Server parameters reported at startup (`server_version`, ...).
    pub server_version: String,
}

/// A message of the streaming replication protocol (inside CopyData).
#[derive(Debug)]
pub enum StreamMessage {
    /// WAL data: here, one pgoutput message.
    XLogData {
        start: Lsn,
        end: Lsn,
        time: i64,
        data: Bytes,
    },
    /// The server's position; `reply` asks for a status update now.
    Keepalive { end: Lsn, time: i64, reply: bool },
}

/// Microseconds since 2000-01-01, the protocol's clock.
pub fn pg_now() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix - 946_684_800_000_000
}

/// Rows of a simple query, as text.
pub type TextRows = Vec<Vec<Option<String>>>;

impl ReplicationConn {
    /// Opens a replication connection to the first host of `info` that answers.
    pub async fn connect(info: &ConnInfo) -> Result<Self, ReplicationError> {
        let tls = crate::tls::plan(info)?;
        let timeout = info.connect_timeout();
        let hosts: Vec<&str> = info.host().split(',').collect();
        let ports: Vec<&str> = info.port().split(',').collect();
        let mut last = None;
        for (i, host) in hosts.iter().enumerate() {
            let port: u16 = ports
                .get(i)
                .or(ports.first())
                .and_then(|p| p.parse().ok())
                .unwrap_or(5432);
            let endpoint = format!("{host}:{port}");
            match tokio::time::timeout(timeout, open(host, port, &tls, info.sslmode())).await {
                Ok(Err(OpenError::Tls(e))) => return Err(e),
                Ok(Err(OpenError::Io(source))) => {
                    last = Some(ReplicationError::Connect { endpoint, source })
                }
                Ok(Ok(stream)) => {
                    let mut conn = ReplicationConn {
                        stream,
                        buf: BytesMut::with_capacity(8192),
                        out: BytesMut::with_capacity(1024),
                        server_version: String::new(),
                    };
                    match tokio::time::timeout(timeout, conn.startup(info)).await {
                        Ok(r) => r?,
                        Err(_) => {
                            return Err(ReplicationError::Timeout {
                                endpoint,
                                secs: timeout.as_secs(),
                            });
                        }
                    }
                    return Ok(conn);
                }
                Err(_) => {
                    last = Some(ReplicationError::Timeout {
                        endpoint,
                        secs: timeout.as_secs(),
                    })
                }
            }
        }
        Err(last.unwrap_or_else(|| ReplicationError::Protocol("no host to connect to".into())))
    }

    async fn startup(&mut self, info: &ConnInfo) -> Result<(), ReplicationError> {
        let mut params = vec![
            ("user", info.user()),
            ("database", info.dbname()),
            ("replication", "database"),
            ("application_name", "hikkoshi"),
            ("client_encoding", "UTF8"),
        ];
        // Values are decoded with these settings: ISO dates and full float precision read back the same on
        // any target, whatever the source server's defaults.
        let options = format!(
            "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 {}",
            info.get("options").unwrap_or("")
        );
        params.push(("options", options.trim_end()));
        frontend::startup_message(params, &mut self.out)?;
        self.flush().await?;
        loop {
            match self.read_message().await? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    let pw = info.password().ok_or(ReplicationError::PasswordMissing)?;
                    frontend::password_message(pw.expose().as_bytes(), &mut self.out)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let pw = info.password().ok_or(ReplicationError::PasswordMissing)?;
                    let hash =
                        md5_hash(info.user().as_bytes(), pw.expose().as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.out)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let pw = info.password().ok_or(ReplicationError::PasswordMissing)?;
                    self.scram(body, pw.expose()).await?;
                }
                backend::Message::AuthenticationKerberosV5 => {
                    return Err(ReplicationError::UnsupportedAuth("Kerberos V5"));
                }
                backend::Message::AuthenticationScmCredential => {
                    return Err(ReplicationError::UnsupportedAuth("SCM credential"));
                }
                backend::Message::AuthenticationGss | backend::Message::AuthenticationSspi => {
                    return Err(ReplicationError::UnsupportedAuth("GSSAPI/SSPI"));
                }
                backend::Message::ParameterStatus(p) => {
                    if p.name()? == "server_version" {
                        self.server_version = p.value()?.to_string();
                    }
                }
                backend::Message::BackendKeyData(_) | backend::Message::NoticeResponse(_) => {}
                backend::Message::ReadyForQuery(_) => return Ok(()),
                backend::Message::ErrorResponse(e) => return Err(server_error(e)),
                _ => {
                    return Err(ReplicationError::Protocol(
                        "unexpected message at startup".into(),
                    ));
                }
            }
        }
    }

    async fn scram(
        &mut self,
        body: backend::AuthenticationSaslBody,
        password: &str,
    ) -> Result<(), ReplicationError> {
        let mut has_scram = false;
        let mut mechs = body.mechanisms();
        while let Some(m) = fallible_next(&mut mechs)? {
            if m == sasl::SCRAM_SHA_256 {
                has_scram = true;
            }
        }
        if !has_scram {
            return Err(ReplicationError::UnsupportedAuth(
                "a SASL mechanism other than SCRAM-SHA-256",
            ));
        }
        let mut scram =
            sasl::ScramSha256::new(password.as_bytes(), sasl::ChannelBinding::unsupported());
        frontend::sasl_initial_response(sasl::SCRAM_SHA_256, scram.message(), &mut self.out)?;
        self.flush().await?;
        match self.read_message().await? {
            backend::Message::AuthenticationSaslContinue(b) => scram.update(b.data())?,
            backend::Message::ErrorResponse(e) => return Err(server_error(e)),
            _ => return Err(ReplicationError::Protocol("unexpected SASL message".into())),
        }
        frontend::sasl_response(scram.message(), &mut self.out)?;
        self.flush().await?;
        match self.read_message().await? {
            backend::Message::AuthenticationSaslFinal(b) => scram.finish(b.data())?,
            backend::Message::ErrorResponse(e) => return Err(server_error(e)),
            _ => return Err(ReplicationError::Protocol("unexpected SASL message".into())),
        }
        Ok(())
    }

    /// Runs one command with the simple-query protocol and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<TextRows, ReplicationError> {
        frontend::query(sql, &mut self.out)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message().await? {
                backend::Message::DataRow(row) => {
                    let buf = row.buffer();
                    let mut ranges = row.ranges();
                    let mut out = Vec::new();
                    while let Some(r) = fallible_next(&mut ranges)? {
                        out.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(out);
                }
                backend::Message::ErrorResponse(e) => error = Some(server_error(e)),
                backend::Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Starts streaming a logical slot from `start` with pgoutput (protocol 1) for `publication`.
    pub async fn start_logical(
        &mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<(), ReplicationError> {
        // Version 2 (PostgreSQL 14+) only adds in-progress streaming, which we do not ask for; the messages
        // we read are the same in both.
        let major: u32 = self
            .server_version
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(10);
        let proto = if major >= 14 { 2 } else { 1 };
        // Logical messages (14+) carry a cutover's fence marker through the stream.
        let messages = if major >= 14 { ", messages 'true'" } else { "" };
        let sql = format!(
            "START_REPLICATION SLOT \"{}\" LOGICAL {start} (proto_version '{proto}', publication_names '\"{}\"'{messages})",
            slot.replace('"', "\"\""),
            publication.replace('"', "\"\"").replace('\'', "''")
        );
        frontend::query(&sql, &mut self.out)?;
        self.flush().await?;
        loop {
            let (tag, body) = self.read_frame().await?;
            match tag {
                b'W' => return Ok(()), // CopyBothResponse: the stream begins
                b'E' => return Err(error_fields(&body)),
                b'N' | b'S' => {}
                b'Z' => {
                    return Err(ReplicationError::Protocol(
                        "START_REPLICATION ended without streaming".into(),
                    ));
                }
                t => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected message {:?} after START_REPLICATION",
                        t as char
                    )));
                }
            }
        }
    }

    /// The next message of the stream; None when the server ended it. Cancel-safe: a message is consumed
    /// only when returned.
    pub async fn next_stream_message(&mut self) -> Result<Option<StreamMessage>, ReplicationError> {
        loop {
            let (tag, mut body) = self.read_frame().await?;
            match tag {
                b'd' => {
                    if body.is_empty() {
                        continue;
                    }
                    let kind = body.get_u8();
                    match kind {
                        b'w' if body.len() >= 24 => {
                            let start = Lsn(body.get_u64());
                            let end = Lsn(body.get_u64());
                            let time = body.get_i64();
                            return Ok(Some(StreamMessage::XLogData {
                                start,
                                end,
                                time,
                                data: body,
                            }));
                        }
                        b'k' if body.len() >= 17 => {
                            let end = Lsn(body.get_u64());
                            let time = body.get_i64();
                            let reply = body.get_u8() == 1;
                            return Ok(Some(StreamMessage::Keepalive { end, time, reply }));
                        }
                        k => {
                            return Err(ReplicationError::Protocol(format!(
                                "unknown replication message {:?}",
                                k as char
                            )));
                        }
                    }
                }
                b'c' | b'C' | b'Z' => return Ok(None),
                b'E' => return Err(error_fields(&body)),
                _ => {}
            }
        }
    }

    /// Tells the source how far the target has received (`written`) and durably applied (`flushed`): the
    /// slot keeps WAL from `flushed` on.
    pub async fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        reply: bool,
    ) -> Result<(), ReplicationError> {
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(written.0);
        msg.put_u64(flushed.0);
        msg.put_u64(flushed.0);
        msg.put_i64(pg_now());
        msg.put_u8(reply as u8);
        frontend::CopyData::new(msg.freeze())?.write(&mut self.out);
        self.flush().await?;
        Ok(())
    }

    /// One raw protocol message: its tag and body.
    async fn read_frame(&mut self) -> Result<(u8, Bytes), ReplicationError> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                if len < 4 {
                    return Err(ReplicationError::Protocol("invalid message length".into()));
                }
                let total = 1 + len as usize;
                if self.buf.len() >= total {
                    let mut frame = self.buf.split_to(total);
                    let tag = frame[0];
                    frame.advance(5);
                    return Ok((tag, frame.freeze()));
                }
                self.buf.reserve(total - self.buf.len());
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ReplicationError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the replication connection",
                )));
            }
        }
    }

    /// Ends the session politely; the server drops temporary slots made on it.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.out);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.flush()).await;
    }

    async fn flush(&mut self) -> Result<(), std::io::Error> {
        self.stream.write_all(&self.out).await?;
        self.out.clear();
        self.stream.flush().await
    }

    async fn read_message(&mut self) -> Result<backend::Message, ReplicationError> {
        loop {
            if let Some(m) = backend::Message::parse(&mut self.buf)? {
                return Ok(m);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ReplicationError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
        }
    }
}

enum OpenError {
    Io(std::io::Error),
    Tls(ReplicationError),
}

impl From<std::io::Error> for OpenError {
    fn from(e: std::io::Error) -> Self {
        OpenError::Io(e)
    }
}

/// Connects, and negotiates TLS as the plan says (SSLRequest, then the handshake; never over a Unix
/// socket, as libpq).
async fn open(
    host: &str,
    port: u16,
    tls: &crate::tls::TlsPlan,
    mode: &str,
) -> Result<Box<dyn Stream>, OpenError> {
    if host.starts_with('/') {
        let path = format!("{host}/.s.PGSQL.{port}");
        return Ok(Box::new(tokio::net::UnixStream::connect(path).await?));
    }
    let mut s = tokio::net::TcpStream::connect((host, port)).await?;
    s.set_nodelay(true)?;
    let crate::tls::TlsPlan::On { config, required } = tls else {
        return Ok(Box::new(s));
    };
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    s.write_all(&req).await?;
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        if *required {
            return Err(OpenError::Tls(ReplicationError::TlsRefused(
                mode.to_string(),
            )));
        }
        return Ok(Box::new(s));
    }
    let name = crate::tls::server_name(host).map_err(|e| OpenError::Tls(e.into()))?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    match connector.connect(name, s).await {
        Ok(t) => Ok(Box::new(t)),
        Err(e) => Err(OpenError::Tls(ReplicationError::TlsHandshake {
            endpoint: format!("{host}:{port}"),
            reason: e.to_string(),
        })),
    }
}

fn fallible_next<I: fallible_iterator::FallibleIterator<Error = std::io::Error>>(
    it: &mut I,
) -> Result<Option<I::Item>, std::io::Error> {
    it.next()
}

/// An ErrorResponse body read as raw fields (`code byte`, NUL-terminated text, ..., 0).
fn error_fields(body: &[u8]) -> ReplicationError {
    let mut code = String::new();
    let mut message = String::new();
    let mut detail = None;
    let mut hint = None;
    let mut rest = body;
    while let Some((&t, tail)) = rest.split_first() {
        if t == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let v = String::from_utf8_lossy(&tail[..end]).into_owned();
        match t {
            b'C' => code = v,
            b'M' => message = v,
            b'D' => detail = Some(v),
            b'H' => hint = Some(v),
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    ReplicationError::Server {
        code,
        message,
        detail,
        hint,
    }
}

/// An ErrorResponse as an error value, fields by their protocol codes (docs, "Error and Notice Message
/// Fields").
fn server_error(body: backend::ErrorResponseBody) -> ReplicationError {
    let mut code = String::new();
    let mut message = String::new();
    let mut detail = None;
    let mut hint = None;
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'C' => code = v,
            b'M' => message = v,
            b'D' => detail = Some(v),
            b'H' => hint = Some(v),
            _ => {}
        }
    }
    ReplicationError::Server {
        code,
        message,
        detail,
        hint,
    }
}
