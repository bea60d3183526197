// Harness for kdeconnect-kde LanLinkProvider::addLink (core/backends/lan/lanlinkprovider.cpp,
// CVE-2020-26164).
//
// addLink turns an accepted TLS socket into a device link kept in m_links. The CVE is resource exhaustion:
// any host on the network can connect under new unpaired device ids without end, and each one gets a link that holds
// its socket open for good. The fix refuses a new untrusted device once m_links holds more than
// MAX_UNPAIRED_CONNECTIONS (42, a constant the fix adds to lanlinkprovider.cpp) and closes its socket.
//
// Stand-ins: a small QObject model with what the function relies on: parent/child ownership (a parent deletes
// its children), deleteLater (run by the driver's event loop; deleting an object drops its pending
// deleteLater), dynamic properties, the destroyed signal, and connect/disconnect of the two signal-slot pairs
// the function and the link use (QAbstractSocket::disconnected -> deleteLater, QObject::destroyed ->
// LanLinkProvider::deviceLinkDestroyed), disconnecting an object's connections when it is deleted, as Qt does;
// QString / QStringList / QMap over the standard library; QSslSocket as a connected socket whose
// disconnectFromHost closes it and emits disconnected at once (its write buffer being empty);
// LanDeviceLink's constructor and reset() and LanLinkProvider::deviceLinkDestroyed as in kdeconnect at the
// fix's parent (the SocketLineReader reduced to the QObject that owns the socket); KdeConnectConfig's trusted
// device list; the onConnectionReceived signal recorded.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#define Q_EMIT
#define Q_ASSERT(cond) ((void)0)

// qCWarning: a line on stderr
struct LogLine {
  LogLine& operator<<(const char* s) { fputs(s, stderr); return *this; }
  LogLine& operator<<(const std::string& s) { fputs(s.c_str(), stderr); return *this; }
  ~LogLine() { fputc('\n', stderr); }
};
#define qCWarning(category) LogLine() << #category " warning: "

class QString : public std::string {
 public:
  QString() = default;
  QString(const char* s) : std::string(s) {}  // NOLINT
  QString(const std::string& s) : std::string(s) {}  // NOLINT
  bool isEmpty() const { return empty(); }
};

class QStringList : public std::vector<QString> {
 public:
  bool contains(const QString& s) const { return std::find(begin(), end(), s) != end(); }
};

template <typename K, typename V>
class QMap {
  std::map<K, V> m_;

 public:
  class iterator {
   public:
    explicit iterator(typename std::map<K, V>::iterator it) : it_(it) {}
    V& value() const { return it_->second; }
    bool operator==(const iterator& o) const { return it_ == o.it_; }
    bool operator!=(const iterator& o) const { return it_ != o.it_; }
    typename std::map<K, V>::iterator it_;
  };
  iterator find(const K& k) { return iterator(m_.find(k)); }
  iterator end() { return iterator(m_.end()); }
  V& operator[](const K& k) { return m_[k]; }
  bool contains(const K& k) const { return m_.count(k) != 0; }
  int size() const { return (int)m_.size(); }
  void erase(iterator it) { m_.erase(it.it_); }
  V take(const K& k) {
    auto it = m_.find(k);
    if (it == m_.end()) return V();
    V v = it->second;
    m_.erase(it);
    return v;
  }
};

// ---- the QObject model ----

class QObject;

class LanLinkProvider;

// a connection to one of the two slot shapes used: QObject::deleteLater-like, or a provider slot taking the sender
struct Connection {
  QObject* sender;
  int signal;
  QObject* receiver;
  void (QObject::*plain_slot)();
  LanLinkProvider* provider;
  void (LanLinkProvider::*provider_slot)(QObject*);
};
enum { SIGNAL_DESTROYED = 1, SIGNAL_DISCONNECTED = 2 };

static std::vector<Connection> connections;
static std::vector<QObject*> posted_deletions;

class QObject {
 public:
  explicit QObject(QObject* parent = nullptr) { setParent(parent); }
  virtual ~QObject() {
    emit_signal(SIGNAL_DESTROYED);
    for (size_t i = connections.size(); i-- > 0;)
      if (connections[i].sender == this || connections[i].receiver == this) connections.erase(connections.begin() + i);
    posted_deletions.erase(std::remove(posted_deletions.begin(), posted_deletions.end(), this),
                           posted_deletions.end());
    while (!children_.empty()) delete children_.back();  // each child removes itself from children_
    setParent(nullptr);
  }
  void setParent(QObject* p) {
    if (parent_) {
      auto& s = parent_->children_;
      s.erase(std::remove(s.begin(), s.end(), this), s.end());
    }
    parent_ = p;
    if (p) p->children_.push_back(this);
  }
  QObject* parent() const { return parent_; }
  void deleteLater() {
    if (std::find(posted_deletions.begin(), posted_deletions.end(), this) == posted_deletions.end())
      posted_deletions.push_back(this);
  }
  void destroyed(QObject* = nullptr) {}  // signal
  void setProperty(const char* name, const QString& v) {
    for (auto& p : properties_)
      if (p.first == name) { p.second = v; return; }
    properties_.push_back({name, v});
  }
  QString property(const char* name) const {
    for (auto& p : properties_)
      if (p.first == name) return p.second;
    return QString();
  }

  template <typename S, typename Signal, typename R, typename Slot>
  static bool connect(S* sender, Signal signal, R* receiver, Slot slot) {
    Connection c = {sender, signal_id(signal), receiver, nullptr, nullptr, nullptr};
    set_slot(c, receiver, slot);
    connections.push_back(c);
    return true;
  }
  template <typename S, typename Signal, typename R, typename Slot>
  static bool disconnect(S* sender, Signal signal, R* receiver, Slot) {
    int id = signal_id(signal);
    QObject* s = sender;
    QObject* r = receiver;
    bool found = false;
    for (size_t i = connections.size(); i-- > 0;) {
      const Connection& c = connections[i];
      if (c.sender == s && c.signal == id && c.receiver == r) {
        connections.erase(connections.begin() + i);
        found = true;
      }
    }
    return found;
  }

 protected:
  void emit_signal(int signal) {
    std::vector<Connection> calls;
    for (auto& c : connections)
      if (c.sender == this && c.signal == signal) calls.push_back(c);
    for (auto& c : calls) {
      if (c.plain_slot) (c.receiver->*c.plain_slot)();
      else call_provider_slot(c.provider, c.provider_slot, this);
    }
  }

 private:
  static int signal_id(void (QObject::*s)(QObject*)) { return s == &QObject::destroyed ? SIGNAL_DESTROYED : 0; }
  template <typename C>
  static int signal_id(void (C::*s)()) {
    return s == &C::disconnected ? SIGNAL_DISCONNECTED : 0;
  }
  static void set_slot(Connection& c, QObject*, void (QObject::*slot)()) { c.plain_slot = slot; }
  template <typename R>
  static void set_slot(Connection& c, R* r, void (LanLinkProvider::*slot)(QObject*)) {
    c.provider = r;
    c.provider_slot = slot;
  }
  static void call_provider_slot(LanLinkProvider* p, void (LanLinkProvider::*slot)(QObject*), QObject* sender);

  QObject* parent_ = nullptr;
  std::vector<QObject*> children_;
  std::vector<std::pair<std::string, QString>> properties_;
};

static void process_events() {
  while (!posted_deletions.empty()) {
    QObject* o = posted_deletions.front();
    posted_deletions.erase(posted_deletions.begin());
    delete o;
  }
}

static int open_sockets = 0;

class QAbstractSocket : public QObject {
 public:
  explicit QAbstractSocket(QObject* parent) : QObject(parent) { open_sockets++; }
  ~QAbstractSocket() override { close(); }
  void disconnected() {}  // signal
  void disconnectFromHost() {
    if (close()) emit_signal(SIGNAL_DISCONNECTED);
  }
  bool isOpen() const { return open_; }

 private:
  bool close() {
    if (!open_) return false;
    open_ = false;
    open_sockets--;
    return true;
  }
  bool open_ = true;
};

class QSslSocket : public QAbstractSocket {
 public:
  explicit QSslSocket(QObject* parent) : QAbstractSocket(parent) {}
};

struct NetworkPacket {
  QString type;
};

class KdeConnectConfig {
 public:
  static KdeConnectConfig& instance() {
    static KdeConnectConfig config;
    return config;
  }
  QStringList trustedDevices() const { return trusted_; }
  QStringList trusted_;
};

class LinkProvider : public QObject {
 public:
  LinkProvider() : QObject(nullptr) {}
};

class DeviceLink : public QObject {
 public:
  DeviceLink(const QString& deviceId, LinkProvider* parent) : QObject(parent), m_deviceId(deviceId) {
    setProperty("deviceId", deviceId);
  }
  const QString& deviceId() const { return m_deviceId; }

 private:
  QString m_deviceId;
};

// SocketLineReader, reduced to the object that owns the link's socket
class SocketLineReader : public QObject {
 public:
  SocketLineReader(QSslSocket* socket, QObject* parent) : QObject(parent), m_socket(socket) {}
  QSslSocket* m_socket;
};

class LanDeviceLink : public DeviceLink {
 public:
  enum ConnectionStarted : bool { Locally, Remotely };
  LanDeviceLink(const QString& deviceId, LinkProvider* parent, QSslSocket* socket, ConnectionStarted source)
      : DeviceLink(deviceId, parent), m_socketLineReader(nullptr) {
    reset(socket, source);
  }
  void reset(QSslSocket* socket, ConnectionStarted connectionSource) {
    if (m_socketLineReader) {
      disconnect(m_socketLineReader->m_socket, &QAbstractSocket::disconnected, this, &QObject::deleteLater);
      delete m_socketLineReader;
    }
    m_socketLineReader = new SocketLineReader(socket, this);
    connect(socket, &QAbstractSocket::disconnected, this, &QObject::deleteLater);
    // We take ownership of the socket: when the link provider destroys us, the socket (and the reader) go too
    socket->setParent(m_socketLineReader);
    m_connectionSource = connectionSource;
  }
  QSslSocket* socket() const { return m_socketLineReader ? m_socketLineReader->m_socket : nullptr; }

 private:
  SocketLineReader* m_socketLineReader;
  ConnectionStarted m_connectionSource = Locally;
};

class LanPairingHandler : public QObject {
 public:
  explicit LanPairingHandler(QObject* parent) : QObject(parent) {}
  void setDeviceLink(DeviceLink* link) { m_link = link; }
  DeviceLink* m_link = nullptr;
};

static const int MAX_UNPAIRED_CONNECTIONS = 42;

class LanLinkProvider : public LinkProvider {
 public:
  void addLink(const QString& deviceId, QSslSocket* socket, NetworkPacket* receivedPacket,
               LanDeviceLink::ConnectionStarted connectionOrigin);
  void deviceLinkDestroyed(QObject* destroyedDeviceLink) {
    const QString id = destroyedDeviceLink->property("deviceId");
    QMap<QString, LanDeviceLink*>::iterator linkIterator = m_links.find(id);
    if (linkIterator != m_links.end()) {
      m_links.erase(linkIterator);
      auto pairingHandler = m_pairingHandlers.take(id);
      if (pairingHandler) pairingHandler->deleteLater();
    }
  }
  void onConnectionReceived(const NetworkPacket&, DeviceLink* link) {  // signal, recorded
    received++;
    last_link = link;
  }

  QMap<QString, LanDeviceLink*> m_links;
  QMap<QString, LanPairingHandler*> m_pairingHandlers;
  int received = 0;
  DeviceLink* last_link = nullptr;
};

void QObject::call_provider_slot(LanLinkProvider* p, void (LanLinkProvider::*slot)(QObject*), QObject* sender) {
  (p->*slot)(sender);
}

#include "function.cpp"

// ---- driver -----------------------------------------------------------------------------------

static int fails = 0;
#define EXPECT(cond)                                                       \
  do {                                                                     \
    if (!(cond)) {                                                         \
      fprintf(stderr, "FAIL: %s (line %d)\n", #cond, __LINE__);            \
      fails = 1;                                                           \
    }                                                                      \
  } while (0)

// a TLS connection from `id` that passed the identity exchange, as LanLinkProvider hands it to addLink: a
// socket owned by the server object, deleted when it disconnects
static QSslSocket* incoming(LanLinkProvider* p, QObject* server, const QString& id, NetworkPacket* identity) {
  QSslSocket* s = new QSslSocket(server);
  QObject::connect(s, &QAbstractSocket::disconnected, s, &QObject::deleteLater);
  p->addLink(id, s, identity, LanDeviceLink::Remotely);
  process_events();
  return s;
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const char* c = argv[1];
  LanLinkProvider* p = new LanLinkProvider();
  QObject* server = new QObject(p);  // the QTcpServer that accepted the sockets
  NetworkPacket identity{"kdeconnect.identity"};
  KdeConnectConfig::instance().trusted_.push_back("trusted_phone");

  if (!strcmp(c, "unpaired_flood")) {
    // one host connecting as 100 different unpaired device ids
    for (int i = 0; i < 100; i++) incoming(p, server, "stranger_" + std::to_string(i), &identity);
    if (open_sockets > MAX_UNPAIRED_CONNECTIONS + 1 || p->m_links.size() > MAX_UNPAIRED_CONNECTIONS + 1) {
      fprintf(stderr, "FAIL: %d sockets held open and %d links kept for unpaired devices\n", open_sockets,
              p->m_links.size());
      fails = 1;
    }
  } else if (!strcmp(c, "new_link")) {
    QSslSocket* s = incoming(p, server, "phone", &identity);
    EXPECT(p->m_links.size() == 1 && p->m_links.contains("phone"));
    LanDeviceLink* link = p->m_links.contains("phone") ? p->m_links["phone"] : nullptr;
    EXPECT(link && link->socket() == s && s->isOpen() && s->parent() != server);
    EXPECT(p->received == 1 && p->last_link == link);
    s->disconnectFromHost();  // the peer goes away: the link goes, and leaves m_links
    process_events();
    EXPECT(p->m_links.size() == 0 && open_sockets == 0);
  } else if (!strcmp(c, "reuse_link")) {
    QSslSocket* first = incoming(p, server, "phone", &identity);
    LanDeviceLink* link = p->m_links["phone"];
    (void)first;
    QSslSocket* second = incoming(p, server, "phone", &identity);
    EXPECT(p->m_links.size() == 1 && p->m_links["phone"] == link);
    EXPECT(link->socket() == second && open_sockets == 1);  // the old socket went with the old reader
    EXPECT(p->received == 2 && p->last_link == link);
  } else if (!strcmp(c, "pairing_handler_rebound")) {
    LanPairingHandler* h = new LanPairingHandler(p);
    p->m_pairingHandlers["phone"] = h;
    incoming(p, server, "phone", &identity);
    EXPECT(p->m_links.contains("phone") && h->m_link == p->m_links["phone"]);
  } else if (!strcmp(c, "trusted_device_always_linked")) {
    for (int i = 0; i < 60; i++) incoming(p, server, "stranger_" + std::to_string(i), &identity);
    QSslSocket* s = incoming(p, server, "trusted_phone", &identity);
    EXPECT(p->m_links.contains("trusted_phone") && s->isOpen());
    EXPECT(p->last_link == p->m_links["trusted_phone"]);
  } else if (!strcmp(c, "refused_connection_closed")) {
    for (int i = 0; i < 43; i++) incoming(p, server, "stranger_" + std::to_string(i), &identity);
    int before = p->received, open_before = open_sockets;
    incoming(p, server, "one_too_many", &identity);
    EXPECT(!p->m_links.contains("one_too_many"));
    EXPECT(p->received == before && open_sockets == open_before);
    EXPECT(p->m_links.size() == 43);
  } else {
    delete p;
    return 2;
  }
  process_events();
  delete p;
  EXPECT(open_sockets == 0);
  return fails;
}
