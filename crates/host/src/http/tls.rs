//! TLS for the HTTP API (rustls): a certificate chain and its private key,
//! both PEM, read once at start so a bad file stops the start with its
//! reason instead of failing every handshake.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{ServerConfig, crypto};

/// The acceptor for `cert` (PEM chain, leaf first) and `key` (PEM, PKCS#8,
/// PKCS#1 or SEC1), offering HTTP/2 and HTTP/1.1 by ALPN; TLS 1.2 and 1.3
/// with rustls' safe defaults.
pub(crate) fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading the HTTP TLS certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| {
            format!(
                "the HTTP TLS certificate {} is not PEM: use a PEM file with the certificate chain, leaf first",
                cert.display()
            )
        })?;
    anyhow::ensure!(
        !chain.is_empty(),
        "the HTTP TLS certificate {} holds no certificate: it must contain -----BEGIN CERTIFICATE----- blocks",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "reading the HTTP TLS key {}: it must be a PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key.display()
        )
    })?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("setting up TLS")?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context(
                "the HTTP TLS key does not match the certificate, or is of a kind rustls refuses",
            )?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::Router;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::http::conn::{ConnLimits, serve};

    fn client(trusted: &[CertificateDer<'static>]) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        for c in trusted {
            roots.add(c.clone()).unwrap();
        }
        let config =
            ClientConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }

    #[tokio::test]
    async fn the_api_speaks_https_with_the_configured_certificate_only() {
        let dir = tempfile::tempdir().unwrap();
        let made = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap();
        let (cert, key) = (dir.path().join("api.pem"), dir.path().join("api-key.pem"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let tls = acceptor(&cert, &key).unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            app,
            ConnLimits::default(),
            Some(tls),
            shutdown.clone(),
        ));

        // A client that trusts the certificate gets its answer.
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut s = client(&[made.cert.der().clone()])
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap_or_default();
        let raw = String::from_utf8_lossy(&raw);
        assert!(
            raw.starts_with("HTTP/1.1 200") && raw.ends_with("ok"),
            "{raw}"
        );

        // One that does not trust it fails the handshake.
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let refused = client(&[other.cert.der().clone()])
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await;
        assert!(refused.is_err(), "a certificate nobody trusts was accepted");

        // Plain HTTP gets no HTTP answer.
        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut raw)).await;
        assert!(!raw.starts_with(b"HTTP/1.1 200"), "plain HTTP was served");

        shutdown.cancel();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn bad_certificate_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (cert, key, wrong, junk) = (
            dir.path().join("c.pem"),
            dir.path().join("k.pem"),
            dir.path().join("other-k.pem"),
            dir.path().join("junk.pem"),
        );
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        std::fs::write(&wrong, other.signing_key.serialize_pem()).unwrap();
        std::fs::write(&junk, "not a pem file").unwrap();
        assert!(acceptor(&cert, &key).is_ok());
        let err = |c: &Path, k: &Path| format!("{:#}", acceptor(c, k).err().unwrap());
        assert!(
            err(&junk, &key).contains("holds no certificate"),
            "{}",
            err(&junk, &key)
        );
        assert!(
            err(&cert, &junk).contains("PEM private key"),
            "{}",
            err(&cert, &junk)
        );
        assert!(
            err(&cert, &wrong).contains("does not match"),
            "{}",
            err(&cert, &wrong)
        );
    }
}
