// route-cpp: length and travel time of a polyline.
//
// Request (JSON):  {"points": [[lat, lon], [lat, lon], ...], "speed_kmh": 40}
//                  speed_kmh is optional (default 40); degrees, WGS84.
// Answer (JSON):   {"distance_m": 1234.5, "eta_s": 111.1, "legs": 2, "longest_leg_m": 800.2}
//
// Distances are great-circle (haversine) on a sphere of the mean Earth radius: within 0.5 % of
// the ellipsoid, plenty for an ETA. The JSON reader below is deliberately tiny and strict (no
// third-party library); anything it does not understand is a clear error, not a guess.
#include <edgefn.hpp>

#include <charconv>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace {

constexpr double kEarthRadiusM = 6371008.8;  // IUGG mean radius
constexpr double kPi = 3.14159265358979323846;
constexpr double kDefaultSpeedKmh = 40.0;
// Bounds the work one request can ask for (and the memory it can make us hold).
constexpr std::size_t kMaxPoints = 100000;

struct Point {
    double lat, lon;
};

class Reader {
   public:
    explicit Reader(std::string_view text) : s_(text) {}

    void expect(char c) {
        ws();
        if (i_ >= s_.size() || s_[i_] != c) fail(std::string("expected '") + c + "'");
        ++i_;
    }
    bool accept(char c) {
        ws();
        if (i_ < s_.size() && s_[i_] == c) {
            ++i_;
            return true;
        }
        return false;
    }
    double number() {
        ws();
        double value = 0;
        auto [end, ec] = std::from_chars(s_.data() + i_, s_.data() + s_.size(), value);
        if (ec != std::errc() || !std::isfinite(value)) fail("expected a number");
        i_ = static_cast<std::size_t>(end - s_.data());
        return value;
    }
    // Object keys: plain strings (escapes are not needed for the keys we know).
    std::string_view key() {
        expect('"');
        std::size_t start = i_;
        while (i_ < s_.size() && s_[i_] != '"') {
            if (s_[i_] == '\\') fail("escaped characters in keys are not supported");
            ++i_;
        }
        if (i_ >= s_.size()) fail("unterminated string");
        return s_.substr(start, i_++ - start);
    }
    // Skips any JSON value (for keys we do not use).
    void skip() {
        ws();
        if (i_ >= s_.size()) fail("expected a value");
        char c = s_[i_];
        if (c == '"') {
            for (++i_; i_ < s_.size() && s_[i_] != '"'; ++i_)
                if (s_[i_] == '\\') ++i_;
            if (i_++ >= s_.size()) fail("unterminated string");
        } else if (c == '{' || c == '[') {
            char close = c == '{' ? '}' : ']';
            ++i_;
            if (accept(close)) return;
            do {
                if (c == '{') {
                    key();
                    expect(':');
                }
                skip();
            } while (accept(','));
            expect(close);
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            number();
        } else {
            for (std::string_view word : {"true", "false", "null"}) {
                if (s_.substr(i_, word.size()) == word) {
                    i_ += word.size();
                    return;
                }
            }
            fail("unexpected character");
        }
    }
    void end() {
        ws();
        if (i_ != s_.size()) fail("unexpected data after the object");
    }

   private:
    void ws() {
        while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r'))
            ++i_;
    }
    [[noreturn]] void fail(const std::string& what) const {
        throw std::invalid_argument("bad request JSON at byte " + std::to_string(i_) + ": " + what);
    }

    std::string_view s_;
    std::size_t i_ = 0;
};

std::vector<Point> read_points(Reader& in) {
    std::vector<Point> points;
    in.expect('[');
    if (in.accept(']')) return points;
    do {
        if (points.size() == kMaxPoints)
            throw std::invalid_argument("more than " + std::to_string(kMaxPoints) + " points");
        in.expect('[');
        Point p{in.number(), 0};
        in.expect(',');
        p.lon = in.number();
        in.expect(']');
        if (p.lat < -90 || p.lat > 90 || p.lon < -180 || p.lon > 180)
            throw std::invalid_argument("point " + std::to_string(points.size()) +
                                        " is not a [lat, lon] pair in degrees");
        points.push_back(p);
    } while (in.accept(','));
    in.expect(']');
    return points;
}

double haversine_m(const Point& a, const Point& b) {
    const double rad = kPi / 180.0;
    double dlat = (b.lat - a.lat) * rad;
    double dlon = (b.lon - a.lon) * rad;
    double h = std::sin(dlat / 2) * std::sin(dlat / 2) +
               std::cos(a.lat * rad) * std::cos(b.lat * rad) * std::sin(dlon / 2) * std::sin(dlon / 2);
    return 2 * kEarthRadiusM * std::asin(std::sqrt(std::fmin(1.0, h)));
}

std::string fixed(double value) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.1f", value);
    return buf;
}

std::string handle(std::string_view request, edgefn::Context& ctx) {
    Reader in(request);
    std::vector<Point> points;
    bool have_points = false;
    double speed_kmh = kDefaultSpeedKmh;
    in.expect('{');
    if (!in.accept('}')) {
        do {
            std::string_view key = in.key();
            in.expect(':');
            if (key == "points") {
                points = read_points(in);
                have_points = true;
            } else if (key == "speed_kmh") {
                speed_kmh = in.number();
            } else {
                in.skip();
            }
        } while (in.accept(','));
        in.expect('}');
    }
    in.end();
    if (!have_points) throw std::invalid_argument("missing \"points\": [[lat, lon], ...]");
    if (points.size() < 2) throw std::invalid_argument("a route needs at least two points");
    if (!(speed_kmh > 0)) throw std::invalid_argument("\"speed_kmh\" must be positive");

    double total = 0, longest = 0;
    for (std::size_t i = 1; i < points.size(); ++i) {
        double leg = haversine_m(points[i - 1], points[i]);
        total += leg;
        longest = std::fmax(longest, leg);
    }
    double eta_s = total / (speed_kmh / 3.6);
    ctx.log(edgefn::Level::debug, std::to_string(points.size()) + " points, " + fixed(total) + " m");
    ctx.set_content_type("application/json");
    return "{\"distance_m\":" + fixed(total) + ",\"eta_s\":" + fixed(eta_s) +
           ",\"legs\":" + std::to_string(points.size() - 1) + ",\"longest_leg_m\":" + fixed(longest) +
           "}";
}

}  // namespace

EDGEFN_FUNCTION(handle)
