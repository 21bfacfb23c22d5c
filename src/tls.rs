//! TLS as libpq does it (libpq docs, "SSL Support", table "SSL Mode Descriptions"), with rustls (ring):
//!
//! | sslmode | encryption | verification |
//! |---|---|---|
//! | disable | never | — |
//! | allow, prefer | if the server offers it | none |
//! | require | always | none; but if a root certificate file exists, as verify-ca (libpq does the same) |
//! | verify-ca | always | the chain up to `sslrootcert` |
//! | verify-full | always | the chain, and the host name against the certificate |
//!
//! `sslrootcert` defaults to `~/.postgresql/root.crt`; `sslrootcert=system` uses the system's roots.
//! `sslcert`/`sslkey` (default `~/.postgresql/postgresql.crt`/`.key`) give a client certificate. A mode that
//! demands TLS never falls back to a plain connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::conninfo::ConnInfo;

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error(
        "sslmode={0} needs a root certificate to verify the server: give sslrootcert=/path/to/ca.crt (or \
         sslrootcert=system for the system's certificate authorities)"
    )]
    NoRootCert(String),
    #[error("TLS setup failed: {0}")]
    Config(String),
}

/// What a connection does about TLS.
pub enum TlsPlan {
    /// sslmode=disable.
    Off,
    /// Offer TLS; `required` refuses a server that does not take it.
    On {
        config: Arc<ClientConfig>,
        required: bool,
    },
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

/// The TLS plan for an endpoint.
pub fn plan(info: &ConnInfo) -> Result<TlsPlan, TlsError> {
    let mode = info.sslmode();
    if mode == "disable" {
        return Ok(TlsPlan::Off);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let root_file = info
        .get("sslrootcert")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".postgresql/root.crt")));
    let root_given = info.get("sslrootcert").is_some();
    let roots_exist = root_file.as_ref().is_some_and(|p| p.is_file())
        || info.get("sslrootcert") == Some("system");
    let verify = match mode {
        "verify-ca" | "verify-full" => true,
        "require" => roots_exist,
        _ => false,
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if verify {
        let roots = load_roots(info, root_file.as_deref(), root_given).map_err(|e| match e {
            TlsError::NoRootCert(_) => TlsError::NoRootCert(mode.to_string()),
            e => e,
        })?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        if mode == "verify-full" {
            builder.with_webpki_verifier(verifier)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly { inner: verifier }))
        }
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider.clone())))
    };
    let config = match client_cert(info)? {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| TlsError::Config(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    Ok(TlsPlan::On {
        config: Arc::new(config),
        required: matches!(mode, "require" | "verify-ca" | "verify-full"),
    })
}

fn load_roots(
    info: &ConnInfo,
    file: Option<&Path>,
    given: bool,
) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    if info.get("sslrootcert") == Some("system") {
        let found = rustls_native_certs::load_native_certs();
        for c in found.certs {
            let _ = roots.add(c);
        }
        return Ok(roots);
    }
    let Some(path) = file.filter(|p| p.is_file() || given) else {
        return Err(TlsError::NoRootCert(String::new()));
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::File {
            what: "root certificate",
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    for c in certs {
        roots.add(c).map_err(|e| TlsError::File {
            what: "root certificate",
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

type ClientCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn client_cert(info: &ConnInfo) -> Result<Option<ClientCert>, TlsError> {
    let cert = info
        .get("sslcert")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".postgresql/postgresql.crt")));
    let key = info
        .get("sslkey")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".postgresql/postgresql.key")));
    let (Some(cert), Some(key)) = (cert, key) else {
        return Ok(None);
    };
    if !cert.is_file() {
        if info.get("sslcert").is_some() {
            return Err(TlsError::File {
                what: "client certificate",
                path: cert.display().to_string(),
                reason: "no such file".into(),
            });
        }
        return Ok(None);
    }
    let certs = CertificateDer::pem_file_iter(&cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::File {
            what: "client certificate",
            path: cert.display().to_string(),
            reason: e.to_string(),
        })?;
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| TlsError::File {
        what: "client key",
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(Some((certs, key)))
}

/// The server name to present and verify (an IP address is verified as one).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_string())
        .map_err(|_| TlsError::Config(format!("\"{host}\" is not a valid TLS server name")))
}

/// sslmode=allow/prefer/require without a root certificate: encryption without verification.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// sslmode=verify-ca: the chain must lead to a trusted root; the host name is not checked.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(v) => Ok(v),
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
