//! Transport security against a real server on loopback: TLS with a
//! certificate from a test CA (rcgen), clients that trust that CA or not,
//! and the plain-HTTP rule (loopback only unless allowed).

use std::path::Path;
use std::time::Duration;

use orchestrator::auth::Credentials;
use orchestrator::client::{ApiClient, ClientError, Transport};
use orchestrator::config::{Limits, ServerConfig};
use orchestrator::server::{ServeError, Server};
use orchestrator::tls::TlsFiles;
use protocol::api::SubmitJobRequest;
use protocol::job::JobSpec;
use protocol::message::Secrets;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

const HOST: &str = "host-credential-for-tls-tests";
const CLIENT: &str = "client-credential-for-tls-tests";

/// Writes a CA certificate (`ca.pem`) and a server certificate for
/// `localhost` and 127.0.0.1 signed by it (`cert.pem`, `key.pem`) into
/// `dir`; returns the server's files.
fn make_pki(dir: &Path) -> TlsFiles {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    }
}

fn config(dir: &Path, listen: &str, tls: Option<TlsFiles>, allow: bool) -> ServerConfig {
    ServerConfig {
        listen: listen.parse().unwrap(),
        archive_dir: dir.join("archive"),
        credentials: Credentials::new(HOST, CLIENT).unwrap(),
        limits: Limits::default(),
        tls,
        allow_insecure_http: allow,
    }
}

async fn submit(client: &ApiClient) -> Result<(), ClientError> {
    let spec = JobSpec::from_yaml("name: t\nruns-on: [linux]\nsteps:\n  - run: echo hi\n").unwrap();
    let request = SubmitJobRequest {
        spec,
        secrets: Secrets(Default::default()),
    };
    client.submit(CLIENT, &request).await.map(|_| ())
}

#[tokio::test]
async fn a_client_that_trusts_the_ca_is_served_over_tls_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_pki(dir.path());
    let server = Server::bind(config(dir.path(), "127.0.0.1:0", Some(files), false))
        .await
        .unwrap();
    let port = server.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    // A connection that never starts its handshake holds up no one.
    let idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();

    let trusting = Transport {
        ca_cert: Some(dir.path().join("ca.pem")),
        allow_insecure_http: false,
    };
    for host in ["localhost", "127.0.0.1"] {
        let client =
            ApiClient::with_transport(&format!("https://{host}:{port}"), &trusting).unwrap();
        tokio::time::timeout(Duration::from_secs(10), submit(&client))
            .await
            .expect("answered while another connection idles in its handshake")
            .unwrap_or_else(|e| panic!("https to {host} with the CA: {e}"));
    }

    // The system's roots do not know the test CA.
    let stranger =
        ApiClient::with_transport(&format!("https://127.0.0.1:{port}"), &Transport::default());
    match stranger {
        Ok(client) => {
            let e = submit(&client).await.unwrap_err();
            assert!(matches!(e, ClientError::Transport { .. }), "{e}");
        }
        // A machine without system roots refuses to build the client at all.
        Err(e) => assert!(matches!(e, ClientError::Tls(_)), "{e}"),
    }
    // Plain HTTP to the TLS port gets no answer it can use.
    let plain = ApiClient::new(&format!("http://127.0.0.1:{port}")).unwrap();
    assert!(submit(&plain).await.is_err());

    drop(idle);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn plain_http_is_for_loopback_unless_explicitly_allowed() {
    let dir = tempfile::tempdir().unwrap();
    // The server: a network address without TLS is refused...
    let e = Server::bind(config(dir.path(), "0.0.0.0:0", None, false))
        .await
        .unwrap_err();
    assert!(matches!(e, ServeError::InsecureListen(_)), "{e}");
    assert!(e.to_string().contains("--tls-cert"), "{e}");
    // ...unless allowed; loopback always is.
    Server::bind(config(dir.path(), "0.0.0.0:0", None, true))
        .await
        .unwrap();
    Server::bind(config(dir.path(), "127.0.0.1:0", None, false))
        .await
        .unwrap();

    // The clients likewise.
    let e = ApiClient::new("http://192.0.2.10:8080").unwrap_err();
    assert!(matches!(e, ClientError::InsecureUrl { .. }), "{e}");
    let allowed = Transport {
        ca_cert: None,
        allow_insecure_http: true,
    };
    ApiClient::with_transport("http://192.0.2.10:8080", &allowed).unwrap();
    ApiClient::new("http://localhost:8080").unwrap();
    ApiClient::new("http://[::1]:8080").unwrap();
    for bad in ["ftp://127.0.0.1/", "not a url", "127.0.0.1:8080"] {
        let e = ApiClient::new(bad).unwrap_err();
        assert!(matches!(e, ClientError::BadUrl { .. }), "{bad}: {e}");
    }
    // A CA file that is not a certificate is named.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "junk\n").unwrap();
    let e = ApiClient::with_transport(
        "https://127.0.0.1:1",
        &Transport {
            ca_cert: Some(junk),
            allow_insecure_http: false,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("junk.pem"), "{e}");
}

/// The binary: `serve` with `--tls-cert`/`--tls-key`, `submit` with
/// `--ca-cert`, and `serve` refusing plain HTTP on a network address.
#[test]
fn the_command_line_serves_and_submits_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_pki(dir.path());
    let spec = dir.path().join("job.yaml");
    std::fs::write(
        &spec,
        "name: t\nruns-on: [linux]\nsteps:\n  - run: echo hi\n",
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_orchestrator");
    let clean = |c: &mut std::process::Command| {
        c.env_remove("KINDLING_SERVER")
            .env_remove("KINDLING_CLIENT_CREDENTIAL")
            .env_remove("KINDLING_HOST_CREDENTIAL")
            .env_remove("KINDLING_CA_CERT")
            .env_remove("RUST_LOG");
    };

    let mut insecure = std::process::Command::new(bin);
    clean(&mut insecure);
    let out = insecure
        .args(["serve", "--listen", "0.0.0.0:0", "--host-credential", HOST])
        .args(["--client-credential", CLIENT, "--archive"])
        .arg(dir.path().join("a1"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("refusing plain HTTP"),
        "{stderr}"
    );

    // A free port (the server binds it right after; nothing else here
    // competes for it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut serve = std::process::Command::new(bin);
    clean(&mut serve);
    let mut server = serve
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--host-credential", HOST, "--client-credential", CLIENT])
        .arg("--tls-cert")
        .arg(&files.cert)
        .arg("--tls-key")
        .arg(&files.key)
        .arg("--archive")
        .arg(dir.path().join("a2"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("https://localhost:{port}");
    let submit = |ca: Option<&Path>| {
        let mut c = std::process::Command::new(bin);
        clean(&mut c);
        c.args(["submit"])
            .arg(&spec)
            .args(["--server", &url, "--credential", CLIENT]);
        if let Some(ca) = ca {
            c.arg("--ca-cert").arg(ca);
        }
        c.output().unwrap()
    };
    let ca = dir.path().join("ca.pem");
    let mut trusted = submit(Some(&ca));
    for _ in 0..50 {
        if trusted.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        trusted = submit(Some(&ca));
    }
    let untrusted = submit(None);
    let _ = server.kill();
    let _ = server.wait();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        trusted.status.success(),
        "{}{}",
        text(&trusted.stdout),
        text(&trusted.stderr)
    );
    assert!(
        text(&trusted.stdout).contains("job-"),
        "{}",
        text(&trusted.stdout)
    );
    assert!(
        !untrusted.status.success(),
        "a client without the CA is refused"
    );
    let why = text(&untrusted.stderr);
    assert!(
        why.contains("certificate"),
        "the refusal names the certificate: {why}"
    );
}
