// route-go: the length of a route and how long it takes at a given speed.
//
// Request:  {"points": [[52.52, 13.405], [48.137, 11.575]], "speed_kmh": 40}
// Response: {"distance_km": 504.2, "eta_min": 756.3, "legs": 1}
//
// With "traffic": "light"|"moderate"|"heavy" it also uses the building blocks
// (docs/building-blocks.md): it asks eta-node for the ETA in that traffic (invoke), counts the
// routes it served in its state, and publishes a traffic/route event. Its manifest grants exactly
// those three; without "traffic" it calls nothing.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"

	edgefn "edgefn.dev/sdk"
)

const earthRadiusKm = 6371.0088 // mean Earth radius (IUGG)

type routeRequest struct {
	Points   [][]float64 `json:"points"`
	SpeedKmh *float64    `json:"speed_kmh"`
	Traffic  string      `json:"traffic"`
}

type routeResponse struct {
	DistanceKm float64 `json:"distance_km"`
	EtaMin     float64 `json:"eta_min"`
	Legs       int     `json:"legs"`
	// Only with "traffic" in the request:
	TrafficEtaMin *float64 `json:"traffic_eta_min,omitempty"`
	Tip           string   `json:"tip,omitempty"`
	RoutesServed  int      `json:"routes_served,omitempty"`
}

func main() { edgefn.Start(handle) }

func handle(ctx context.Context, req *edgefn.Request) ([]byte, error) {
	var in routeRequest
	if err := req.Decode(&in); err != nil {
		return nil, fmt.Errorf(`bad input: expected {"points": [[lat, lon], ...], "speed_kmh": N}: %w`, err)
	}
	if err := validate(in); err != nil {
		return nil, fmt.Errorf("bad input: %w", err)
	}
	km := 0.0
	for i := 1; i < len(in.Points); i++ {
		km += haversineKm(in.Points[i-1], in.Points[i])
	}
	out := routeResponse{
		DistanceKm: round(km, 3),
		EtaMin:     round(km / *in.SpeedKmh * 60, 1),
		Legs:       len(in.Points) - 1,
	}
	edgefn.Logf(ctx, edgefn.LevelDebug, "route of %d points: %.3f km", len(in.Points), km)
	if in.Traffic != "" {
		if err := withTraffic(ctx, km, *in.SpeedKmh, in.Traffic, &out); err != nil {
			return nil, err
		}
	}
	return req.ReplyJSON(out)
}

// withTraffic asks eta-node (invoke), counts routes (state) and reports the route (publish).
func withTraffic(ctx context.Context, km, speed float64, traffic string, out *routeResponse) error {
	var eta struct {
		EtaMin float64 `json:"eta_min"`
		Tip    string  `json:"tip"`
	}
	leg := map[string]any{"distance_km": km, "speed_kmh": speed, "traffic": traffic}
	if err := edgefn.InvokeJSON(ctx, "eta-node", leg, &eta); err != nil {
		return fmt.Errorf("eta-node: %w", err)
	}
	out.TrafficEtaMin, out.Tip = &eta.EtaMin, eta.Tip
	served := 0
	if v, err := edgefn.State(ctx).Get("routes_served"); err == nil {
		served, _ = strconv.Atoi(string(v))
	} else if !errors.Is(err, edgefn.ErrNotFound) {
		return fmt.Errorf("state: %w", err)
	}
	served++
	if err := edgefn.State(ctx).Set("routes_served", []byte(strconv.Itoa(served))); err != nil {
		return fmt.Errorf("state: %w", err)
	}
	out.RoutesServed = served
	event, _ := json.Marshal(map[string]any{"distance_km": out.DistanceKm, "traffic": traffic})
	// An agent that is not joined to a platform has nowhere to publish: the route still counts.
	if err := edgefn.Publish(ctx, "traffic/route", event); err != nil && !errors.Is(err, edgefn.ErrUnavailable) {
		return fmt.Errorf("publish: %w", err)
	}
	return nil
}

func validate(in routeRequest) error {
	if len(in.Points) < 2 {
		return fmt.Errorf("points: need at least 2 points, got %d", len(in.Points))
	}
	for i, p := range in.Points {
		if len(p) != 2 {
			return fmt.Errorf("points[%d]: want [lat, lon], got %d numbers", i, len(p))
		}
		if !(p[0] >= -90 && p[0] <= 90) {
			return fmt.Errorf("points[%d]: latitude %v is outside [-90, 90]", i, p[0])
		}
		if !(p[1] >= -180 && p[1] <= 180) {
			return fmt.Errorf("points[%d]: longitude %v is outside [-180, 180]", i, p[1])
		}
	}
	if in.SpeedKmh == nil {
		return errors.New("speed_kmh: missing")
	}
	if s := *in.SpeedKmh; !(s > 0) || math.IsInf(s, 0) {
		return fmt.Errorf("speed_kmh: must be a positive number, got %v", s)
	}
	return nil
}

// haversineKm is the great-circle distance between two [lat, lon] points in degrees.
func haversineKm(a, b []float64) float64 {
	lat1, lat2 := a[0]*math.Pi/180, b[0]*math.Pi/180
	dLat, dLon := lat2-lat1, (b[1]-a[1])*math.Pi/180
	h := math.Pow(math.Sin(dLat/2), 2) + math.Cos(lat1)*math.Cos(lat2)*math.Pow(math.Sin(dLon/2), 2)
	return 2 * earthRadiusKm * math.Asin(math.Min(1, math.Sqrt(h)))
}

func round(x float64, digits int) float64 {
	p := math.Pow(10, float64(digits))
	return math.Round(x*p) / p
}
