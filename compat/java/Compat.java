// A Java agent reaching an API through keygate. Run with the source launcher:
//   java -Djavax.net.ssl.trustStore=keygate.p12 -Djavax.net.ssl.trustStorePassword=changeit \
//        -Dhttps.proxyHost=127.0.0.1 -Dhttps.proxyPort=10255 \
//        -Dhttps.proxyUser=agent -Dhttps.proxyPassword=$TOKEN \
//        -Djdk.http.auth.tunneling.disabledSchemes= \
//        Compat.java MODE URL HEADER VALUE
// MODE: httpclient-h2 | httpclient-h1 | urlconnection. Prints the status
// line, the protocol and the body. The JDK itself ignores https.proxyUser /
// https.proxyPassword; the Authenticator below answers the proxy's 407 with them.
import java.io.InputStream;
import java.net.Authenticator;
import java.net.HttpURLConnection;
import java.net.PasswordAuthentication;
import java.net.ProxySelector;
import java.net.URI;
import java.net.URL;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;

public class Compat {
    static final Authenticator PROXY_AUTH = new Authenticator() {
        @Override
        protected PasswordAuthentication getPasswordAuthentication() {
            if (getRequestorType() != RequestorType.PROXY) {
                return null;
            }
            String user = System.getProperty("https.proxyUser", "agent");
            String pass = System.getProperty("https.proxyPassword", "");
            return new PasswordAuthentication(user, pass.toCharArray());
        }
    };

    public static void main(String[] args) throws Exception {
        String mode = args[0];
        URI uri = URI.create(args[1]);
        String header = args[2];
        String value = args[3];
        if (mode.startsWith("httpclient")) {
            HttpClient client = HttpClient.newBuilder()
                    .version(mode.equals("httpclient-h2") ? HttpClient.Version.HTTP_2 : HttpClient.Version.HTTP_1_1)
                    .proxy(ProxySelector.getDefault())
                    .authenticator(PROXY_AUTH)
                    .connectTimeout(Duration.ofSeconds(15))
                    .build();
            HttpRequest req = HttpRequest.newBuilder(uri)
                    .timeout(Duration.ofSeconds(20))
                    .header(header, value)
                    .header("Content-Type", "application/json")
                    .POST(HttpRequest.BodyPublishers.ofString("{\"model\":\"gpt-test\",\"messages\":[]}"))
                    .build();
            HttpResponse<String> resp = client.send(req, HttpResponse.BodyHandlers.ofString());
            System.out.println(resp.statusCode());
            System.out.println(resp.version());
            System.out.println(resp.body());
        } else {
            Authenticator.setDefault(PROXY_AUTH);
            HttpURLConnection conn = (HttpURLConnection) new URL(uri.toString()).openConnection();
            conn.setConnectTimeout(15000);
            conn.setReadTimeout(20000);
            conn.setRequestProperty(header, value);
            int status = conn.getResponseCode();
            InputStream in = status < 400 ? conn.getInputStream() : conn.getErrorStream();
            System.out.println(status);
            System.out.println("HTTP_1_1");
            System.out.println(new String(in.readAllBytes(), StandardCharsets.UTF_8));
        }
    }
}
