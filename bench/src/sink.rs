//! `moat-bench sink`: an HTTPS (or plain HTTP) upload sink. It reads each
//! request body to the end, counting bytes, then answers `{"bytes":N}`.
//! (nginx answers a discarded body before it has read it, which would let
//! an upload "finish" before its bytes were sent.)

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use crate::net::{self, Result};

/// Arguments of `moat-bench sink`.
#[derive(Debug, clap::Args)]
pub struct SinkArgs {
    /// Where to listen (loopback only).
    #[arg(long)]
    pub listen: String,
    /// PEM certificate chain (with --key: HTTPS).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long)]
    pub key: Option<PathBuf>,
}

async fn sink(req: Request<Incoming>) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    let mut body = req.into_body();
    let mut n = 0u64;
    let mut failed = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    n += d.len() as u64;
                }
            }
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    let mut resp = Response::new(Full::new(Bytes::from(format!("{{\"bytes\":{n}}}\n"))));
    if failed {
        *resp.status_mut() = http::StatusCode::BAD_REQUEST;
    }
    Ok(resp)
}

/// Runs `moat-bench sink` until killed.
pub async fn main(args: SinkArgs) -> Result<()> {
    let listen = net::loopback(args.listen.parse()?)?;
    let tls = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => {
            let certs =
                CertificateDer::pem_file_iter(cert)?.collect::<std::result::Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(key)?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(certs, key)?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
        }
        (None, None) => None,
        _ => return Err("--cert and --key go together".into()),
    };
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(sink);
            let builder = hyper::server::conn::http1::Builder::new();
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                }
            }
        });
    }
}
